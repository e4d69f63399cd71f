"""The ``exchange`` command.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.
A user error is always one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from exchange import __version__
from exchange.errors import ConfigurationError, ExchangeError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad arguments: exit 2 with one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {value!r} (expected 1-65535)") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {value!r} (expected 1-65535)")
    return port


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be positive")
    return number


def _settings(args: argparse.Namespace, **overrides: Any) -> Any:
    from exchange.config import load_settings

    return load_settings(getattr(args, "config", None), **overrides)


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML settings file (EXCHANGE_* variables override it)",
    )


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    _add_config(parser)
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, help="port to bind")
    parser.add_argument("--data-dir", type=Path, metavar="DIR", help="where to keep data")


# -- verbs -----------------------------------------------------------------


def _serve(args: argparse.Namespace, role: str) -> int:
    from exchange import serve

    overrides: dict[str, Any] = {"host": args.host, "port": args.port, "data_dir": args.data_dir}
    if role == "node":
        overrides["node_id"] = args.node_id
    settings = _settings(args, **overrides)
    return serve.run(role, settings)


def _demo(args: argparse.Namespace) -> int:
    from exchange import demo

    return demo.run(state_file=args.state, data_dir=args.data_dir)


def _import(args: argparse.Namespace) -> int:
    from exchange.node import importer

    settings = _settings(args, data_dir=args.data_dir, node_id=args.node_id)
    return importer.run(
        settings, args.path, args.tenant, quarantine=args.quarantine, progress=not args.quiet
    )


def _dev_token(args: argparse.Namespace) -> int:
    from exchange.security import devidp
    from exchange.security.keys import load_or_create

    if args.state is not None:
        try:
            state = json.loads(args.state.read_text())
            issuer, key_file = state["idp"], Path(state["dev"]["idp_key"])
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigurationError(f"{args.state} is not a demo state file") from None
        if not key_file.exists():
            raise ConfigurationError(f"the demo's IdP key {key_file} is gone; is the demo running?")
        audience = state.get("dev", {}).get("audience", "exchange")
        idp = devidp.DevIdentityProvider(issuer, load_or_create(key_file), audience)
    else:
        settings = _settings(args)
        if not settings.dev_idp:
            raise ConfigurationError(
                "the development IdP is off (set EXCHANGE_DEV_IDP=true "
                "and EXCHANGE_DEV_MODE=true, or pass --state FILE)"
            )
        from exchange.hub.services import SERVICE, idp_issuer

        idp = devidp.DevIdentityProvider.open(
            settings.data_path(SERVICE), idp_issuer(settings), settings.audience
        )
    print(
        idp.issue(
            sub=args.sub,
            role=args.role,
            org=args.org,
            purpose=args.purpose,
            patient=args.patient,
            scope=args.scope,
            ttl=args.ttl,
        )
    )
    return EXIT_OK


def _node_settings(args: argparse.Namespace) -> Any:
    return _settings(args, data_dir=args.data_dir, node_id=args.node_id)


def _api_key(args: argparse.Namespace) -> int:
    from exchange.node.services import build

    settings = _node_settings(args)
    if args.tenant not in settings.tenants:
        raise ConfigurationError(f"unknown tenant {args.tenant!r} on this node")
    services = build(settings)
    try:
        if args.revoke:
            count = services.credentials.revoke_api_keys(args.tenant)
            print(f"revoked {count} API key(s) of tenant {args.tenant}")
        else:
            print(services.credentials.create_api_key(args.tenant, args.label or ""))
    finally:
        services.close()
    return EXIT_OK


def _shred(args: argparse.Namespace) -> int:
    from exchange.node.storage import service_name
    from exchange.security.keystore import shred

    settings = _node_settings(args)
    if args.confirm != args.tenant:
        raise ConfigurationError(
            f"shredding destroys every image of tenant {args.tenant!r} for ever; "
            f"repeat the tenant id with --confirm {args.tenant} to proceed"
        )
    directory = settings.data_path(service_name(settings)) / "keys" / "tenants"
    if not shred(directory, args.tenant):
        raise ConfigurationError(f"tenant {args.tenant!r} has no key on this node")
    print(f"tenant {args.tenant}: key destroyed; its images and index can no longer be read")
    return EXIT_OK


def _add_node_flags(parser: argparse.ArgumentParser) -> None:
    _add_config(parser)
    parser.add_argument("--data-dir", type=Path, metavar="DIR", help="the node's data directory")
    parser.add_argument("--node-id", help="the node's id (EXCHANGE_NODE_ID)")


def build_parser() -> argparse.ArgumentParser:
    from exchange.security.tokens import ROLES

    parser = _Parser(prog="exchange", description="Federated medical-image exchange for an HIE.")
    parser.add_argument("--version", action="version", version=f"exchange {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)

    serve = verbs.add_parser("serve", help="run the hub or a site node")
    roles = serve.add_subparsers(dest="role", metavar="ROLE", parser_class=_Parser)
    hub = roles.add_parser("hub", help="run the hub (FHIR index, broker, decisions, audit)")
    _add_serve_flags(hub)
    hub.set_defaults(handler=lambda a: _serve(a, "hub"))
    node = roles.add_parser("node", help="run a site node (intake, encrypted store, DICOMweb)")
    _add_serve_flags(node)
    node.add_argument("--node-id", help="this node's id (EXCHANGE_NODE_ID)")
    node.set_defaults(handler=lambda a: _serve(a, "node"))
    serve.set_defaults(handler=lambda _a: _missing(serve, "ROLE"))

    demo = verbs.add_parser("demo", help="run a demo federation: a hub and two site nodes")
    demo.add_argument(
        "--state",
        type=Path,
        default=Path("demo.json"),
        metavar="FILE",
        help="where to write URLs, tokens and patients (default demo.json)",
    )
    demo.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="keep the demo's data here (default: a temporary directory)",
    )
    demo.set_defaults(handler=_demo)

    imp = verbs.add_parser("import", help="import DICOM files, folders or a DICOMDIR into a node")
    imp.add_argument("path", type=Path, help="file, folder or DICOMDIR")
    imp.add_argument("--tenant", required=True, help="tenant the images belong to")
    _add_config(imp)
    imp.add_argument("--data-dir", type=Path, metavar="DIR", help="the node's data directory")
    imp.add_argument("--node-id", help="the node's id (EXCHANGE_NODE_ID)")
    imp.add_argument(
        "--quarantine",
        type=Path,
        metavar="DIR",
        help="where rejected files go (default: <data-dir>/quarantine)",
    )
    imp.add_argument("--quiet", action="store_true", help="no progress bar")
    imp.set_defaults(handler=_import)

    node_admin = verbs.add_parser("node", help="administer a site node (credentials, keys)")
    node_verbs = node_admin.add_subparsers(dest="node_verb", metavar="TOOL", parser_class=_Parser)
    api_key = node_verbs.add_parser("api-key", help="create (or revoke) a tenant's STOW-RS API key")
    api_key.add_argument("--tenant", required=True)
    api_key.add_argument("--label", help="what the key is for (shown to operators)")
    api_key.add_argument("--revoke", action="store_true", help="revoke all of the tenant's keys")
    _add_node_flags(api_key)
    api_key.set_defaults(handler=_api_key)
    shred_parser = node_verbs.add_parser(
        "shred-tenant", help="destroy a tenant's key: all its data becomes unreadable"
    )
    shred_parser.add_argument("--tenant", required=True)
    shred_parser.add_argument("--confirm", metavar="TENANT", help="repeat the tenant id")
    _add_node_flags(shred_parser)
    shred_parser.set_defaults(handler=_shred)
    node_admin.set_defaults(handler=lambda _a: _missing(node_admin, "TOOL"))

    dev = verbs.add_parser("dev", help="development helpers (never for production)")
    dev_verbs = dev.add_subparsers(dest="dev_verb", metavar="TOOL", parser_class=_Parser)
    token = dev_verbs.add_parser("token", help="print a JWT from the development IdP")
    token.add_argument("--sub", required=True, help="subject (user or system id)")
    token.add_argument("--role", required=True, choices=ROLES)
    token.add_argument("--org", required=True, help="organisation the subject acts for")
    token.add_argument(
        "--purpose",
        action="append",
        metavar="CODE",
        help="HL7 PurposeOfUse code (TREAT, ETREAT, …); repeatable",
    )
    token.add_argument("--patient", help="patient context (FHIR Patient id)")
    token.add_argument("--scope", help="space-separated SMART scopes (default: by role)")
    token.add_argument("--ttl", type=_positive, default=3600, metavar="SECONDS")
    token.add_argument(
        "--state",
        type=Path,
        metavar="FILE",
        help="sign with the running demo's IdP (its state file)",
    )
    _add_config(token)
    token.set_defaults(handler=_dev_token)
    dev.set_defaults(handler=lambda _a: _missing(dev, "TOOL"))
    return parser


def _missing(parser: argparse.ArgumentParser, what: str) -> int:
    parser.print_help(sys.stderr)
    raise UsageError(f"{parser.prog}: {what} is required")


def _fail(message: str, code: int) -> int:
    print(f"exchange: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
        if handler is None:
            parser.print_help()
            return EXIT_USAGE
        return handler(args)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except ConfigurationError as exc:
        return _fail(exc.message, EXIT_USAGE)
    except ExchangeError as exc:
        return _fail(exc.message, EXIT_FAILURE)
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        return _fail(
            f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc), EXIT_FAILURE
        )
