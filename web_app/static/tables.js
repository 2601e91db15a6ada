// Below ~600 px a table of cases, users or audit events becomes stacked rows (style.css); each cell then
// carries its column's name, taken here from the header row so that templates keep plain tables.
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("table.cases:not(.confusion)").forEach(function (table) {
    var rows = Array.prototype.slice.call(table.rows);
    var head = rows.find(function (r) { return Array.prototype.every.call(r.cells, function (c) { return c.tagName === "TH"; }); });
    if (!head) return;
    head.classList.add("head");
    var names = Array.prototype.map.call(head.cells, function (c) { return c.textContent.trim(); });
    rows.forEach(function (r) {
      if (r === head) return;
      Array.prototype.forEach.call(r.cells, function (cell, i) {
        if (names[i] && !cell.hasAttribute("data-label")) cell.setAttribute("data-label", names[i]);
      });
    });
    table.classList.add("stackable");
  });
});
