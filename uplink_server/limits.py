"""How large an upload may be, in bytes and pixels: one place for the image decoder and the DICOM reader."""

MAX_BYTES = 64 * 1024 * 1024  # upload size limit
MAX_PIXELS = 60_000_000  # e.g. 7750 x 7750; larger is refused before decoding
# bytes a DICOM's pixel data may decode to (rows x columns x frames x samples x bytes per sample): a 16-bit
# gray film of MAX_PIXELS fits, a colour or multi-frame one of that size does not
MAX_DECODED_BYTES = 2 * MAX_PIXELS
MIN_SIDE = 32
