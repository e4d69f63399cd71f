"""The ``exchange`` command.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.
A user error is always one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
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


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} must not be negative")
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


def _pydicom_without_pixel_libraries() -> None:
    """Load pydicom with numpy, Pillow and requests hidden from it.

    pydicom imports them at once for its pixel handlers and test-data downloads;
    ``exchange import`` uses neither (it validates the header and stores the bytes as
    they are), and they were ~0.13 s, a fifth of its start-up. Nothing changes where
    pydicom is already loaded, and the three stay importable afterwards.
    """
    if "pydicom" in sys.modules:
        return
    import importlib.abc
    from collections.abc import Sequence as Paths
    from importlib.machinery import ModuleSpec
    from types import ModuleType

    class Hidden(importlib.abc.MetaPathFinder):
        def find_spec(
            self, name: str, path: Paths[str] | None, target: ModuleType | None = None
        ) -> ModuleSpec | None:
            if name.partition(".")[0] in ("numpy", "PIL", "requests"):
                raise ModuleNotFoundError(f"{name} is not loaded by exchange import", name=name)
            return None

    hidden = Hidden()
    sys.meta_path.insert(0, hidden)
    try:
        import pydicom  # noqa: F401
    finally:
        sys.meta_path.remove(hidden)


def _import(args: argparse.Namespace) -> int:
    import gc

    # Start-up makes ~100k objects that live until the command exits: collecting while
    # they were made was ~60 ms of it (a tenth), so they are frozen out of collections.
    collecting = gc.isenabled()
    gc.disable()
    try:
        _pydicom_without_pixel_libraries()
        from exchange.node import importer

        settings = _settings(args, data_dir=args.data_dir, node_id=args.node_id)
    finally:
        gc.freeze()
        if collecting:
            gc.enable()
    try:
        return importer.run(
            settings, args.path, args.tenant, quarantine=args.quarantine, progress=not args.quiet
        )
    finally:
        gc.unfreeze()  # for callers in the same process (tests)


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


def _dev_client(args: argparse.Namespace) -> int:
    """A node's client_credentials client at the hub's development IdP (compose/, dev-idp)."""
    from exchange.security import devidp

    settings = _settings(args)
    if not settings.dev_idp:
        raise ConfigurationError(
            "the development IdP is off (set EXCHANGE_DEV_IDP=true and EXCHANGE_DEV_MODE=true)"
        )
    from exchange.hub.services import SERVICE, idp_issuer

    idp = devidp.DevIdentityProvider.open(
        settings.data_path(SERVICE), idp_issuer(settings), settings.audience
    )
    try:
        secret = idp.register_client(args.client_id, args.org)
    except ValueError as exc:
        raise UsageError(f"exchange dev client: {exc}") from None
    print(secret)
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


def _reconcile(args: argparse.Namespace) -> int:
    from exchange.node.reconcile import Reconciler
    from exchange.node.services import build

    settings = _node_settings(args)
    services = build(settings)
    try:
        if services.publisher is None or services.hub is None:
            raise ConfigurationError(
                "publishing is not configured: set EXCHANGE_HUB_URL and a hub credential "
                "(EXCHANGE_HUB_CLIENT_ID/SECRET or EXCHANGE_HUB_TOKEN)"
            )
        reconciler = Reconciler(
            settings,
            services.engine,
            services.store,
            services.outbox,
            services.hub,
            services.publisher,
        )
        report = reconciler.run(dry_run=args.dry_run, wait=args.wait)
    finally:
        services.close()
    print("\n".join(report.lines()))
    return EXIT_OK


def _load_synthetic(args: argparse.Namespace) -> int:
    from exchange.database import make_engine
    from exchange.fhir import synthetic
    from exchange.hub.services import SERVICE

    settings = _settings(args, data_dir=args.data_dir)
    try:
        spec = synthetic.Spec(args.studies, args.patients, seed=args.seed, sites=args.sites)
    except ValueError as exc:
        raise UsageError(f"exchange hub load-synthetic: {exc}") from None
    url = settings.database(SERVICE)
    engine = make_engine(url)

    shown = [0.0]

    def progress(step: synthetic.Progress) -> None:
        if step.seconds - shown[0] < 2 and step.done < step.total:
            return
        shown[0] = step.seconds
        share = step.done / step.total if step.total else 1.0
        print(
            f"  {step.done:,}/{step.total:,} resources ({share:.0%}) in {step.seconds:.1f} s",
            file=sys.stderr,
            flush=True,
        )

    print(
        f"loading {spec.sites} sites, {spec.patients:,} patients and {spec.studies:,} studies "
        f"(seed {spec.seed}) into {engine.url.render_as_string(hide_password=True)}",
        file=sys.stderr,
        flush=True,
    )
    try:
        summary = synthetic.load(
            engine, spec, local_base=f"{settings.base_url()}/fhir", progress=progress
        )
    finally:
        engine.dispose()
    print(summary.describe())
    return EXIT_OK


def _audit_log(args: argparse.Namespace) -> Any:
    """The hub's audit trail, opened from the hub's settings (its database and key)."""
    from exchange.audit.log import AuditLog
    from exchange.database import make_engine
    from exchange.fhir.repository import SqlRepository
    from exchange.hub.services import SERVICE, grant_key_path
    from exchange.security.keys import load_or_create

    settings = _settings(args, data_dir=args.data_dir)
    url = settings.database(SERVICE)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise ConfigurationError(f"no hub database at {url.removeprefix('sqlite:///')}")
    key_file = grant_key_path(settings)
    signer = load_or_create(key_file) if key_file.is_file() else None
    engine = make_engine(url)
    return AuditLog(engine, SqlRepository(engine), signer), engine


def _audit_verify(args: argparse.Namespace) -> int:
    audit, engine = _audit_log(args)
    try:
        result = audit.verify()
    finally:
        engine.dispose()
    if result.ok:
        print(f"audit chain intact: {result.records} records, {result.checkpoints} checkpoints")
        return EXIT_OK
    where = f"record {result.first_broken_seq}" if result.first_broken_seq else ""
    if result.first_broken_id:
        name = f"AuditEvent/{result.first_broken_id}"
        where = f"{where} ({name})" if where else name
    problem = result.problem or "unknown problem"
    if where and problem.startswith(f"{where} "):
        problem = "it " + problem.removeprefix(f"{where} ")
    print(f"audit chain BROKEN at {where}: {problem}")
    return EXIT_FAILURE


def _audit_export(args: argparse.Namespace) -> int:
    import os
    import tempfile
    from datetime import UTC

    since = args.since
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    audit, engine = _audit_log(args)
    try:
        if args.out is None or str(args.out) == "-":
            count = audit.export(sys.stdout, since)
            sys.stdout.flush()
            target = "standard output"
        else:
            path: Path = args.out
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    count = audit.export(handle, since)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            target = str(path)
    finally:
        engine.dispose()
    print(f"exported {count} AuditEvents to {target}", file=sys.stderr)
    return EXIT_OK


def _access_codes(args: argparse.Namespace) -> Any:
    """The hub's access codes, audit trail and patient index, from the hub's settings."""
    from exchange.fhir.mpi import PatientIndex
    from exchange.fhir.repository import SqlRepository
    from exchange.hub.accesscodes import AccessCodes, CodeKey, Limits, key_path
    from exchange.hub.services import SERVICE

    audit, engine = _audit_log(args)
    settings = _settings(args, data_dir=args.data_dir)
    key_file = key_path(settings.data_path(SERVICE))
    if not key_file.is_file():
        engine.dispose()
        raise ConfigurationError(f"no access-code key at {key_file}: has this hub issued codes?")
    codes = AccessCodes(engine, CodeKey.load_or_create(key_file), Limits.from_settings(settings))
    base = f"{settings.base_url()}/fhir"
    patients = PatientIndex(engine, SqlRepository(engine), settings.hie_identifier_system, base)
    return codes, audit, patients, engine, settings


def _access_code_list(args: argparse.Namespace) -> int:
    codes, _audit, patients, engine, _ = _access_codes(args)
    pid = str(args.patient).removeprefix("Patient/")
    try:
        found = codes.for_patients(patients.linked([pid]) or [pid])
    finally:
        engine.dispose()
    now = codes.now_ms()
    if args.json:
        print(json.dumps([code.as_json(now) for code in found], indent=2))
        return EXIT_OK
    if not found:
        print(f"no access codes for Patient/{pid}")
        return EXIT_OK
    for code in found:
        shown = code.as_json(now)
        print(
            f"{shown['id']}  {shown['state']:<8} Patient/{code.patient}  "
            f"{len(code.studies)} studies  issued {shown['issued']} by {code.issued_by} "
            f"({code.organization})  expires {shown['expires']}  "
            f"verified {code.method} {shown['verification']['verified_at']}"
        )
    return EXIT_OK


def _access_code_revoke(args: argparse.Namespace) -> int:
    import getpass

    from exchange.audit.events import What, Who, build
    from exchange.hub.accesscodes import MalformedCode, normalise_id

    try:
        plain = normalise_id(args.id)
    except MalformedCode:
        raise UsageError(
            f"exchange access-code revoke: {args.id!r} is not an access code id (like K7QD-3M9X)"
        ) from None
    codes, audit, _patients, engine, settings = _access_codes(args)
    by = f"cli:{args.by or getpass.getuser()}"
    try:
        if codes.get(plain) is None:
            return _fail(f"no access code {args.id}", EXIT_FAILURE)
        code, revoked_now = codes.revoke(plain, by)
        said = "revoked" if revoked_now else "was already revoked"
        audit.record(
            build(
                action="access-code-revoke",
                who=Who(user=by, role="operator", organization=None),
                what=What(
                    patients=(code.patient,), study=code.studies[0] if code.studies else None
                ),
                allowed=True,
                observer=settings.base_url(),
                reason=f"access code {code.display_id} {said} (command line)",
            )
        )
    finally:
        engine.dispose()
    print(f"access code {code.display_id} {said}")
    return EXIT_OK


def _backup_settings(args: argparse.Namespace) -> Any:
    return _settings(args, data_dir=args.data_dir, node_id=args.node_id)


def _backup(args: argparse.Namespace) -> int:
    from exchange.backup import commands

    if args.to is None:
        raise UsageError("exchange backup: --to DEST is required (or a TOOL: verify, key)")
    return commands.run_backup(
        _backup_settings(args),
        args.to,
        role=args.role,
        keys_to=args.keys_to,
        no_keys=args.no_keys,
        key_file=args.backup_key_file,
        quiet=args.quiet,
    )


def _backup_verify(args: argparse.Namespace) -> int:
    from exchange.backup import commands

    return commands.run_verify(
        _settings(args),
        args.source,
        snapshot_id=args.snapshot,
        keys_from=args.keys_from,
        key_file=args.backup_key_file,
        quiet=args.quiet,
    )


def _backup_key(args: argparse.Namespace) -> int:
    from exchange.backup import commands

    return commands.run_keygen(args.out)


def _restore(args: argparse.Namespace) -> int:
    from exchange.backup import commands

    return commands.run_restore(
        _backup_settings(args),
        args.source,
        role=args.role,
        snapshot_id=args.snapshot,
        keys_from=args.keys_from,
        key_file=args.backup_key_file,
        force=args.force,
        quiet=args.quiet,
    )


def _add_backup_verbs(verbs: Any) -> None:
    """backup [verify | key] and restore (exchange.backup; docs/operations.md)."""

    def common(parser: argparse.ArgumentParser, service: bool) -> None:
        _add_config(parser)
        if service:
            parser.add_argument(
                "--role",
                choices=["hub", "node"],
                help="default: node when tenants are configured, else hub",
            )
            parser.add_argument("--data-dir", type=Path, metavar="DIR", help="its data directory")
            parser.add_argument("--node-id", help="the node's id (EXCHANGE_NODE_ID)")
        parser.add_argument(
            "--backup-key-file",
            type=Path,
            metavar="FILE",
            help="the backup key (default EXCHANGE_BACKUP_KEY_FILE or EXCHANGE_BACKUP_KEY)",
        )
        parser.add_argument("--quiet", action="store_true", help="no progress bar")

    backup = verbs.add_parser(
        "backup",
        help="back up a running hub or node (database, blobs, wrapped keys); verify a backup",
        description="A consistent online snapshot: the database dumped in one read "
        "transaction (encrypted with the backup key), the node's encrypted blobs (only new "
        "ones are copied), the keys wrapped with the backup key and stored apart "
        "(--keys-to). DEST and the key location: a directory or s3://BUCKET/PREFIX.",
    )
    backup.add_argument("--to", metavar="DEST", help="where the backup goes")
    backup.add_argument(
        "--keys-to", metavar="KEYDEST", help="where the wrapped key bundle goes (not DEST)"
    )
    backup.add_argument("--no-keys", action="store_true", help="do not export the keys")
    common(backup, service=True)
    backup.set_defaults(handler=_backup)
    backup_verbs = backup.add_subparsers(dest="backup_verb", metavar="TOOL", parser_class=_Parser)
    verify = backup_verbs.add_parser(
        "verify",
        help="check every file of a backup against its manifest, without restoring",
        description="Exit 0 when intact, 1 when a file is missing or corrupted (named).",
    )
    verify.add_argument("--from", dest="source", required=True, metavar="SRC")
    verify.add_argument("--snapshot", metavar="ID", help="default: the newest of each service")
    verify.add_argument(
        "--keys-from", metavar="KEYSRC", help="also check (and open) the key bundle there"
    )
    common(verify, service=False)
    verify.set_defaults(handler=_backup_verify)
    key = backup_verbs.add_parser("key", help="create a new backup key file (0600)")
    key.add_argument("--out", type=Path, required=True, metavar="FILE")
    key.set_defaults(handler=_backup_key)

    restore = verbs.add_parser(
        "restore",
        help="rebuild a hub or node from a backup (stop the service first)",
        description="Checks every file against the manifest before writing anything, builds "
        "the data directory aside and swaps it in (PostgreSQL: one transaction). Refuses a "
        "non-empty target unless --force.",
    )
    restore.add_argument("--from", dest="source", required=True, metavar="SRC")
    restore.add_argument("--snapshot", metavar="ID", help="default: the newest of this service")
    restore.add_argument(
        "--keys-from", metavar="KEYSRC", help="the key bundle, or the location holding it"
    )
    restore.add_argument("--force", action="store_true", help="replace a non-empty target")
    common(restore, service=True)
    restore.set_defaults(handler=_restore)


def _hub_index(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The hub's settings, database engine and FHIR index (verbs that work on its database)."""
    from exchange.database import make_engine
    from exchange.fhir.repository import SqlRepository
    from exchange.hub.services import SERVICE

    settings = _settings(args, data_dir=args.data_dir)
    url = settings.database(SERVICE)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise ConfigurationError(f"no hub database at {url.removeprefix('sqlite:///')}")
    engine = make_engine(url)
    return settings, engine, SqlRepository(engine, local_base=f"{settings.base_url()}/fhir")


def _share_list(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from exchange.fhir.mpi import PatientIndex
    from exchange.hub import sharing

    patient = str(args.patient).removeprefix("Patient/")
    if not sharing.is_fhir_id(patient):
        raise UsageError(f"exchange share list: {patient!r} is not a Patient id")
    settings, engine, repository = _hub_index(args)
    try:
        index = PatientIndex(engine, repository, settings.hie_identifier_system)
        found = sharing.shares_of_patients(
            repository, index.linked([patient]), datetime.now(UTC), every=args.all
        )
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps([s.as_json() for s in found], indent=2))
    for share in [] if args.json else found:
        print(share.describe())
    if not found and not args.json:
        which = "" if args.all else "active "
        print(f"no {which}shares of Patient/{patient}'s studies", file=sys.stderr)
    return EXIT_OK


def _share_revoke(args: argparse.Namespace) -> int:
    import getpass

    from exchange.audit.events import What, Who, build
    from exchange.audit.log import AuditLog
    from exchange.hub import sharing
    from exchange.hub.services import grant_key_path
    from exchange.security.keys import load_or_create

    settings, engine, repository = _hub_index(args)
    try:
        stored = sharing.load_share(repository, args.id)
        share = sharing.share_of(stored.body)
        ended, changed = sharing.end_share(repository, stored)
        key_file = grant_key_path(settings)
        signer = load_or_create(key_file) if key_file.is_file() else None
        try:
            user = getpass.getuser()
        except (OSError, KeyError):
            user = "unknown"
        said = "revoked by an HIE operator with the exchange CLI"
        AuditLog(engine, repository, signer, issuer=settings.base_url()).record(
            build(
                action="revoke",
                who=Who(user=f"cli:{user}", role="operator", organization=None),
                what=What(
                    patients=(share.patient,) if share.patient else (),
                    study=share.study,
                    resource=f"Consent/{share.id}",
                ),
                allowed=True,
                observer=settings.base_url(),
                reason=said if changed else f"{said}; it had already ended",
            )
        )
    finally:
        engine.dispose()
    if changed:
        print(f"revoked Consent/{share.id} (now version {ended.version}, inactive)")
    else:
        print(f"Consent/{share.id} had already ended ({ended.body.get('status')}); nothing changed")
    return EXIT_OK


def _policy_dir(args: argparse.Namespace) -> Path:
    if args.policy_dir is not None:
        return Path(args.policy_dir)
    return Path(_settings(args).policy_dir)


def _percent(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid percentage {value!r}") from None
    if not 0 <= number <= 100:
        raise argparse.ArgumentTypeError(f"{value!r} is not between 0 and 100")
    return number


def _instant(value: str) -> Any:
    from datetime import datetime

    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid date/time {value!r} (ISO 8601)") from None


def _policy_test(args: argparse.Namespace) -> int:
    from exchange.policy.testing import run_tests

    report = run_tests(_policy_dir(args))
    failed = report.failed
    for test in report.tests if args.verbose else failed:
        print(
            f"{'PASS' if test.passed else 'FAIL'} {test.id}"
            + (f": {test.problem}" if test.problem else "")
        )
    print(f"policy version {report.version}: {len(report.tests)} tests, {len(failed)} failed")
    print("line coverage of the policies:")
    for file in report.coverage:
        missing = (
            f"; not covered: lines {', '.join(map(str, file.not_covered))}"
            if file.not_covered
            else ""
        )
        print(f"  {file.path}: {file.percent:.1f}% of {file.lines} lines{missing}")
    print(f"  total: {report.percent:.1f}% (minimum {args.min_coverage:g}%)")
    if not report.tests:
        print("exchange: error: no test_ rules found beside the policies", file=sys.stderr)
        return EXIT_FAILURE
    if failed:
        return EXIT_FAILURE
    if report.percent < args.min_coverage:
        print(
            f"exchange: error: coverage {report.percent:.1f}% is below {args.min_coverage:g}%",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return EXIT_OK


def _policy_engine(args: argparse.Namespace) -> Any:
    from exchange.policy.engine import EmbeddedEngine

    return EmbeddedEngine(_policy_dir(args), watch=False)


def _policy_explain(args: argparse.Namespace) -> int:
    from exchange.policy import tools

    claims = tools.claims_from_token(args.token) if args.token else tools.load_claims(args.claims)
    subject = tools.subject_of(claims, args.reason, args.purpose or ())
    study = tools.pick_study(tools.load_studies(args.study_file), args.study, args.study_file)
    consents = tools.load_consents(args.consents)
    decision = tools.explain(_policy_engine(args), subject, study, args.action, consents, args.now)
    if args.json:
        print(json.dumps(decision.as_json(), indent=2))
        return EXIT_OK
    verdict = "ALLOWED" if decision.allow else "REFUSED"
    print(f"{args.action} of study {study.study} by {tools.describe_subject(subject)}: {verdict}")
    for reason in decision.reasons:
        print(f"  - {reason}")
    for obligation in decision.obligations:
        print(f"  obligation {obligation.get('code')}: {obligation.get('text', '')}")
    print(f"policy version {decision.policy_version}; input sha256 {decision.input_digest}")
    if args.token:
        print("(the token's signature was not checked: explain reads its claims only)")
    return EXIT_OK


def _policy_what_if(args: argparse.Namespace) -> int:
    from exchange.policy import tools

    studies = tools.load_studies(args.study_file)
    callers = None
    if args.callers is not None:
        listed = tools.load_claims(args.callers)
        callers = [tools.subject_of(c) for c in (listed if isinstance(listed, list) else [listed])]
    result = tools.what_if(
        _policy_engine(args),
        args.patient,
        studies,
        tools.load_consents(args.consents),
        tools.load_consents(args.consent),
        callers,
        tuple(args.action or ("view", "export")),
        args.now,
    )
    if args.json:
        print(json.dumps([c.as_json() for c in result.changes], indent=2))
        return EXIT_OK
    print(
        f"{len(result.studies)} studies x {len(result.callers)} callers x "
        f"{len(result.actions)} actions: "
        f"{len(result.changes)} of {result.compared} decisions change"
    )
    for change in result.changes:
        before = "allowed" if change.before.allow else "refused"
        after = "allowed" if change.after.allow else "refused"
        print(
            f"  study {change.study}, {change.action} by {tools.describe_subject(change.caller)}: "
            f"{before} -> {after} ({change.after.reason()})"
        )
    return EXIT_OK


def _add_policy_flags(parser: argparse.ArgumentParser) -> None:
    _add_config(parser)
    parser.add_argument(
        "--policy-dir",
        type=Path,
        metavar="DIR",
        help="the policies (default: EXCHANGE_POLICY_DIR, else the repository's policies/)",
    )


def _add_offline_flags(parser: argparse.ArgumentParser) -> None:
    _add_policy_flags(parser)
    parser.add_argument(
        "--study-file",
        type=Path,
        required=True,
        metavar="FILE",
        help="resource facts JSON: {study, uid, patient[], custodian, security_labels[], date}"
        " or a list of them",
    )
    parser.add_argument(
        "--now", type=_instant, metavar="WHEN", help="decide as at this ISO 8601 time"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")


def _add_node_flags(parser: argparse.ArgumentParser) -> None:
    _add_config(parser)
    parser.add_argument("--data-dir", type=Path, metavar="DIR", help="the node's data directory")
    parser.add_argument("--node-id", help="the node's id (EXCHANGE_NODE_ID)")


class _Choices:
    """Another module's tuple of choices, read only when argparse checks or shows it.

    Importing the token module (httpx, PyJWT) and the policy package just to build
    the parser cost every verb ~0.1 s of start-up, ``exchange import`` included. Set
    as ``action.choices`` after ``add_argument``, which would otherwise iterate them.
    """

    def __init__(self, module: str, name: str) -> None:
        self._module, self._name = module, name

    def _values(self) -> tuple[str, ...]:
        import importlib

        return tuple(getattr(importlib.import_module(self._module), self._name))

    def __contains__(self, value: object) -> bool:
        return value in self._values()

    def __iter__(self) -> Iterator[str]:
        return iter(self._values())


def build_parser() -> argparse.ArgumentParser:
    ACTIONS = _Choices("exchange.policy.decisions", "ACTIONS")  # noqa: N806 - the constant's name
    ROLES = _Choices("exchange.security.tokens", "ROLES")  # noqa: N806

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
    reconcile = node_verbs.add_parser(
        "reconcile",
        help="compare the node's studies with the hub's index and repair the differences",
        description="Publish studies the hub lacks or has out of date, retract those the node "
        "no longer holds, retry publications the hub refused. Safe while the node runs: it "
        "queues the repairs in the node's outbox, which the running node delivers.",
    )
    reconcile.add_argument(
        "--dry-run", action="store_true", help="only report the differences and the outbox"
    )
    reconcile.add_argument(
        "--wait", action="store_true", help="deliver the repairs before returning"
    )
    _add_node_flags(reconcile)
    reconcile.set_defaults(handler=_reconcile)
    node_admin.set_defaults(handler=lambda _a: _missing(node_admin, "TOOL"))

    hub_admin = verbs.add_parser("hub", help="administer the hub (bulk data)")
    hub_verbs = hub_admin.add_subparsers(dest="hub_verb", metavar="TOOL", parser_class=_Parser)
    synthetic = hub_verbs.add_parser(
        "load-synthetic",
        help="bulk-load generated, profile-valid data fast (for benchmarks and demos)",
        description="Write synthetic sites (Organization + DICOMweb Endpoint), patients "
        "(Synthetic^NNNN) and imaging studies straight into the hub's database, in large "
        "transactions. Safe while the hub runs; the same seed gives the same data, and "
        "what is already stored is skipped.",
    )
    synthetic.add_argument("--studies", type=_count, required=True, metavar="N")
    synthetic.add_argument("--patients", type=_positive, required=True, metavar="M")
    synthetic.add_argument("--seed", type=_count, default=1, metavar="S", help="default 1")
    synthetic.add_argument("--sites", type=_positive, default=4, metavar="K", help="default 4")
    _add_config(synthetic)
    synthetic.add_argument("--data-dir", type=Path, metavar="DIR", help="the hub's data directory")
    synthetic.set_defaults(handler=_load_synthetic)
    hub_admin.set_defaults(handler=lambda _a: _missing(hub_admin, "TOOL"))

    audit = verbs.add_parser(
        "audit",
        help="check and export the hub's hash-chained audit trail",
        description="Read the hub's database (its settings: --config, EXCHANGE_*; safe while "
        "the hub runs).",
    )
    audit_verbs = audit.add_subparsers(dest="audit_verb", metavar="TOOL", parser_class=_Parser)
    verify = audit_verbs.add_parser(
        "verify",
        help="walk the chain; name the first record altered, deleted or out of order",
        description="Exit 0 when the chain is intact, 1 when it is broken (the first broken "
        "record is named).",
    )
    _add_config(verify)
    verify.add_argument("--data-dir", type=Path, metavar="DIR", help="the hub's data directory")
    verify.set_defaults(handler=_audit_verify)
    export = audit_verbs.add_parser(
        "export", help="write AuditEvents as NDJSON (one per line, chain order) for a SIEM"
    )
    export.add_argument(
        "--since",
        type=_instant,
        metavar="WHEN",
        help="only events recorded at or after this ISO 8601 date/time (UTC if no zone)",
    )
    export.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="write here, atomically ('-' or omitted: standard output)",
    )
    _add_config(export)
    export.add_argument("--data-dir", type=Path, metavar="DIR", help="the hub's data directory")
    export.set_defaults(handler=_audit_export)
    audit.set_defaults(handler=lambda _a: _missing(audit, "TOOL"))

    _add_backup_verbs(verbs)

    share = verbs.add_parser(
        "share",
        help="list and revoke providers' shares of studies (HIE operators)",
        description="Read and change the hub's database (its settings: --config, EXCHANGE_*; "
        "safe while the hub runs). Revoking is audited.",
    )
    share_verbs = share.add_subparsers(dest="share_verb", metavar="TOOL", parser_class=_Parser)
    share_list = share_verbs.add_parser(
        "list", help="the shares of a patient's studies (every linked patient record)"
    )
    share_list.add_argument("--patient", required=True, metavar="ID", help="a Patient id")
    share_list.add_argument(
        "--all", action="store_true", help="also shares that were revoked or have ended"
    )
    share_list.add_argument("--json", action="store_true", help="print JSON")
    _add_config(share_list)
    share_list.add_argument("--data-dir", type=Path, metavar="DIR", help="the hub's data directory")
    share_list.set_defaults(handler=_share_list)
    share_revoke = share_verbs.add_parser(
        "revoke", help="end a share now (its Consent becomes inactive; audited)"
    )
    share_revoke.add_argument("id", metavar="ID", help="the share's Consent id")
    _add_config(share_revoke)
    share_revoke.add_argument(
        "--data-dir", type=Path, metavar="DIR", help="the hub's data directory"
    )
    share_revoke.set_defaults(handler=_share_revoke)
    share.set_defaults(handler=lambda _a: _missing(share, "TOOL"))

    access_code = verbs.add_parser(
        "access-code",
        help="list and revoke patient access codes (the hub's database)",
        description="Read the hub's database (its settings: --config, EXCHANGE_*; safe while "
        "the hub runs). Codes themselves are never shown: only their ids.",
    )
    code_verbs = access_code.add_subparsers(
        dest="access_code_verb", metavar="TOOL", parser_class=_Parser
    )
    code_list = code_verbs.add_parser("list", help="a patient's access codes and their state")
    code_list.add_argument("--patient", required=True, metavar="ID", help="the Patient id")
    code_list.add_argument("--json", action="store_true", help="print JSON")
    _add_config(code_list)
    code_list.add_argument("--data-dir", type=Path, metavar="DIR", help="the hub's data directory")
    code_list.set_defaults(handler=_access_code_list)
    code_revoke = code_verbs.add_parser(
        "revoke", help="revoke an access code (audited); exit 1 if there is no such code"
    )
    code_revoke.add_argument("id", metavar="ID", help="the code's id (its first two groups)")
    code_revoke.add_argument("--by", metavar="NAME", help="who revokes it (default: your login)")
    _add_config(code_revoke)
    code_revoke.add_argument(
        "--data-dir", type=Path, metavar="DIR", help="the hub's data directory"
    )
    code_revoke.set_defaults(handler=_access_code_revoke)
    access_code.set_defaults(handler=lambda _a: _missing(access_code, "TOOL"))

    policy = verbs.add_parser(
        "policy",
        help="test the access policies and explain their decisions (offline)",
        description="Work on policies/ alone: no hub, no database. explain and what-if read "
        "the study facts and the consents from files (--study-file, --consents: a FHIR Bundle, "
        "an array of Consent resources or one Consent).",
    )
    policy_verbs = policy.add_subparsers(dest="policy_verb", metavar="TOOL", parser_class=_Parser)
    test = policy_verbs.add_parser(
        "test", help="compile, run every test_ rule, print line coverage of the policies"
    )
    _add_policy_flags(test)
    test.add_argument(
        "--min-coverage",
        type=_percent,
        default=90.0,
        metavar="PCT",
        help="fail below this line coverage (default 90)",
    )
    test.add_argument("-v", "--verbose", action="store_true", help="list every test")
    test.set_defaults(handler=_policy_test)
    explain = policy_verbs.add_parser(
        "explain", help="the decision and its reasons for one caller, study and action"
    )
    who = explain.add_mutually_exclusive_group(required=True)
    who.add_argument("--token", metavar="JWT", help="the caller's token (claims read, not checked)")
    who.add_argument("--claims", type=Path, metavar="FILE", help="the caller's claims as JSON")
    explain.add_argument("--study", metavar="ID", help="which study of --study-file (id or UID)")
    explain.add_argument("--action", default="view").choices = ACTIONS
    explain.add_argument("--consents", type=Path, metavar="FILE", help="the patient's consents")
    explain.add_argument(
        "--purpose", action="append", metavar="CODE", help="override the purpose of use"
    )
    explain.add_argument("--reason", help="a break-the-glass reason")
    _add_offline_flags(explain)
    explain.set_defaults(handler=_policy_explain)
    what_if = policy_verbs.add_parser(
        "what-if", help="which decisions about a patient's studies a new consent would change"
    )
    what_if.add_argument("--patient", required=True, metavar="ID", help="the patient's id")
    what_if.add_argument(
        "--consent", type=Path, required=True, metavar="FILE", help="the new consent(s)"
    )
    what_if.add_argument("--consents", type=Path, metavar="FILE", help="the consents in force now")
    what_if.add_argument(
        "--callers",
        type=Path,
        metavar="FILE",
        help="claims of the callers to try (default: a clinician of each organisation named)",
    )
    what_if.add_argument(
        "--action", action="append", help="repeatable (default view, export)"
    ).choices = ACTIONS
    _add_offline_flags(what_if)
    what_if.set_defaults(handler=_policy_what_if)
    policy.set_defaults(handler=lambda _a: _missing(policy, "TOOL"))

    certs = verbs.add_parser(
        "certs",
        help="create a development PKI for HTTPS and mutual TLS (hub and nodes)",
        description="A server CA (hub and node HTTPS certificates), a client CA (the hub's "
        "client certificate, which nodes require) and their certificates; keys 0600.",
    )
    certs_verbs = certs.add_subparsers(dest="certs_verb", metavar="TOOL", parser_class=_Parser)
    certs_init = certs_verbs.add_parser(
        "init", help="write CAs and certificates into DIR (never overwrites without --force)"
    )
    certs_init.add_argument("--dir", type=Path, required=True, metavar="DIR")
    certs_init.add_argument(
        "--hub-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a further DNS name or IP of the hub (loopback names are always in); repeatable",
    )
    certs_init.add_argument(
        "--node", action="append", default=[], metavar="ID", help="a node's id; repeatable"
    )
    certs_init.add_argument("--days", type=_positive, default=365, metavar="N")
    certs_init.add_argument("--force", action="store_true", help="replace existing files")
    certs_init.set_defaults(handler=_certs_init)
    certs_show = certs_verbs.add_parser("show", help="describe a PEM certificate file")
    certs_show.add_argument("file", type=Path, metavar="FILE")
    certs_show.set_defaults(handler=_certs_show)
    certs.set_defaults(handler=lambda _a: _missing(certs, "TOOL"))

    db = verbs.add_parser(
        "db",
        help="the database schema: upgrade it, show its revision (Alembic migrations)",
        description="Uses the service's settings (--config, EXCHANGE_*). --role defaults to "
        "node when tenants are configured, else hub.",
    )
    db_verbs = db.add_subparsers(dest="db_verb", metavar="TOOL", parser_class=_Parser)
    db_upgrade = db_verbs.add_parser(
        "upgrade", help="bring the schema to this version (safe while services run)"
    )
    db_upgrade.add_argument(
        "--sql", action="store_true", help="print the SQL instead of running it (offline)"
    )
    db_upgrade.add_argument(
        "--from", dest="start", metavar="REV", help="with --sql: the revision to start from"
    )
    db_current = db_verbs.add_parser(
        "current", help="the schema's revision (exit 1 when it is behind this version)"
    )
    for db_parser in (db_upgrade, db_current):
        db_parser.add_argument("--role", choices=["hub", "node"])
        _add_config(db_parser)
    db_upgrade.set_defaults(handler=_db_upgrade)
    db_current.set_defaults(handler=_db_current)
    db.set_defaults(handler=lambda _a: _missing(db, "TOOL"))

    dev = verbs.add_parser("dev", help="development helpers (never for production)")
    dev_verbs = dev.add_subparsers(dest="dev_verb", metavar="TOOL", parser_class=_Parser)
    token = dev_verbs.add_parser("token", help="print a JWT from the development IdP")
    token.add_argument("--sub", required=True, help="subject (user or system id)")
    token.add_argument("--role", required=True).choices = ROLES
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
    client = dev_verbs.add_parser(
        "client",
        help="register (or re-key) a node's client at the development IdP; print its secret",
    )
    client.add_argument("--id", dest="client_id", required=True, help="the client id")
    client.add_argument("--org", required=True, help="organisation the client acts for")
    _add_config(client)
    client.set_defaults(handler=_dev_client)
    dev.set_defaults(handler=lambda _a: _missing(dev, "TOOL"))
    return parser


def _certs_init(args: argparse.Namespace) -> int:
    from exchange.security import tls

    return tls.init_command(args.dir, args.hub_host, args.node, args.days, args.force)


def _certs_show(args: argparse.Namespace) -> int:
    from exchange.security import tls

    return tls.show_command(args.file)


def _db_upgrade(args: argparse.Namespace) -> int:
    from exchange.migrations.commands import upgrade_command

    return upgrade_command(_settings(args), args.role, sql=args.sql, start=args.start)


def _db_current(args: argparse.Namespace) -> int:
    from exchange.migrations.commands import current_command

    return current_command(_settings(args), args.role)


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
