"""``python -m web_app {serve,create-user}``."""

from __future__ import annotations

import argparse
import getpass
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m web_app", description="Self-hosted chest X-ray screening web app")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the web app (default http://127.0.0.1:8000)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--data-dir", default=None, help="database, uploads and secrets (default ./web_app_data or $CXR_DATA_DIR)")
    s.add_argument("--no-local-model", action="store_true", help="serve only through connected model servers")
    s.add_argument("--model", default=None, help="in-process model file (default: weights/)")
    s.add_argument("--max-batch", type=int, default=None, help="largest batch the in-process model runs (default 16)")
    s.add_argument("--batch-delay-ms", type=float, default=None,
                   help="how long a batch waits for requests still being prepared (default 5 ms; 0: never wait)")
    s.add_argument("--dicom-port", type=int, default=None,
                   help="also run a DICOM node (Storage SCP) on this port: the X-ray unit or PACS sends studies here")
    s.add_argument("--dicom-ae-title", default=None, help="the node's AE title (default CXRSCREEN)")
    s.add_argument("--dicom-allowed", default=None, help="calling AE titles allowed to send: AET or AET@host, comma-separated")
    s.add_argument("--dicom-destination", default=None, help="where results go back: AET@host:port (the PACS)")
    u = sub.add_parser("create-user", help="add a user")
    u.add_argument("email")
    u.add_argument("--role", choices=["admin", "doctor", "technician"], default="technician")
    u.add_argument("--name", default="")
    u.add_argument("--password", default=None, help="(prompted if omitted)")
    u.add_argument("--data-dir", default=None)
    sc = sub.add_parser("scrub", help="de-identify again every upload stored by an older version")
    sc.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)

    from .config import Settings

    over = {}
    if args.cmd == "serve":
        if args.no_local_model:
            over["local_model"] = False
        if args.model:
            over["model_path"] = args.model
        if args.max_batch is not None:
            over["max_batch"] = args.max_batch
        if args.batch_delay_ms is not None:
            over["batch_delay_ms"] = args.batch_delay_ms
        for key in ("dicom_port", "dicom_ae_title", "dicom_allowed", "dicom_destination"):
            if getattr(args, key) is not None:
                over[key] = getattr(args, key)
    settings = Settings.from_env(args.data_dir, **over)
    if args.cmd == "serve":
        import uvicorn

        from .app import create_app

        app = create_app(settings)
        print(f"Chest X-ray screening at http://{args.host}:{args.port}  (data: {settings.data_dir})", flush=True)
        print(f"Model servers connect with: python -m uplink_server connect --url http://{args.host}:{args.port} --key {settings.uplink_key}", flush=True)
        # X-Forwarded-For only from the reverse proxies named in CXR_TRUSTED_PROXIES: trusted from anyone (or from
        # 127.0.0.1 by default, uvicorn's choice), a client on the same host could pose as any address and slip
        # past the per-address sign-in lock
        proxies = settings.trusted_proxies
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", ws_max_size=128 * 1024 * 1024,
                    proxy_headers=bool(proxies), forwarded_allow_ips=proxies or None)
        return 0
    from sqlalchemy import select

    from .db import User, make_engine, migrate, session_factory
    from .security import hash_password

    migrate(settings.database_url)
    if args.cmd == "scrub":
        from .cases import scrub_stored

        with session_factory(make_engine(settings.database_url))() as db:
            counts = scrub_stored(db, settings)
        print(f"{counts['rewritten']} stored uploads de-identified again, {counts['deleted']} deleted (could not be de-identified)")
        return 0
    # the first admin exists whatever command runs first (CXR_ADMIN_PASSWORD honoured here as at serve)
    from .app import ensure_admin

    generated = ensure_admin(session_factory(make_engine(settings.database_url)), settings)
    if generated:
        print(f"First admin account: {settings.admin_email} / password: {generated}  (change it, or set CXR_ADMIN_PASSWORD)", flush=True)
    password = args.password or getpass.getpass("password: ")
    if len(password) < 8:
        print("error: the password needs at least 8 characters", file=sys.stderr)
        return 2
    with session_factory(make_engine(settings.database_url))() as db:
        if db.scalar(select(User).where(User.email == args.email.lower())):
            print(f"error: {args.email} exists", file=sys.stderr)
            return 2
        db.add(User(email=args.email.lower(), name=args.name, password_hash=hash_password(password), role=args.role))
        db.commit()
    print(f"created {args.role} {args.email}")
    return 0
