"""`kiln deploy`, `route`, `shadow`, `promote`, `rollback`, `retire` and `models`: versions of a
served model, changed locally (deploy/admin_actions.py) or through a server's admin route."""

from __future__ import annotations

import logging
from pathlib import Path

from kiln import admin_client, declaration
from kiln.cli.serve import server_arguments
from kiln.deploy import admin_actions, lifecycle, versions

log = logging.getLogger("kiln")


def _run(action) -> int:
    """The action's line printed; a refusal or failure logged, exit 1."""
    try:
        print(action())
    except (versions.VersionsError, lifecycle.LifecycleError, declaration.DeclarationError,
            admin_client.AdminError, OSError) as err:
        log.error("%s", err)
        return 1
    except Exception as err:  # an export or archive that failed: nothing was changed
        from kiln.model_store.archive import ArchiveError
        from kiln.training.export import ExportError, ParityError

        if not isinstance(err, (ArchiveError, ExportError, ParityError)):
            raise
        gate = "the parity gate failed: " if isinstance(err, ParityError) else ""
        log.error("%s%s; nothing was deployed", gate, err)
        return 1
    return 0


def _act(args, local, action: str, **arguments) -> int:
    """`local()` here, or with --admin-url the same action through the admin route."""
    if args.admin_url is None:
        return _run(local)
    return _run(lambda: admin_client.Admin.of(args).act(args.name, action, arguments))


def cmd_deploy(args) -> int:
    return _act(args, lambda: admin_actions.deploy(
        args.run_dir, args.store, args.name, args.models_dirs, args.version, args.backend,
        args.allow_signature_change), "deploy", version=args.version, backend=args.backend,
        allow_signature_change=args.allow_signature_change)


def cmd_promote(args) -> int:
    return _act(args, lambda: admin_actions.promote(args.run_dir, args.store, args.name,
                                                    args.version),
                "promote", version=args.version)


def cmd_rollback(args) -> int:
    return _act(args, lambda: admin_actions.rollback(args.run_dir, args.store, args.name),
                "rollback")


def cmd_retire(args) -> int:
    return _act(args, lambda: admin_actions.retire(args.run_dir, args.store, args.name,
                                                   args.version),
                "retire", version=args.version)


def cmd_route(args) -> int:
    try:
        weights = parse_weights(args.weights) if args.weights else None
    except versions.VersionsError as err:
        log.error("%s", err)
        return 1
    return _act(args, lambda: admin_actions.route(args.run_dir, args.name, weights),
                "route", weights=weights)


def parse_weights(given: list[str]) -> dict[str, float]:
    """["1.0=90", "2.0=10"] as {version: percent}."""
    weights = {}
    for item in given:
        v, _, weight = item.partition("=")
        if v in weights:
            raise versions.VersionsError(f"{v} is given two weights")
        try:
            weights[v] = float(weight)
        except ValueError:
            raise versions.VersionsError(f"{item!r}: say VERSION=PERCENT (1.0=90)") from None
    return weights


def cmd_shadow(args) -> int:
    return _act(args, lambda: admin_actions.shadow(args.run_dir, args.name, args.version,
                                                   args.fraction),
                "shadow", version=args.version, fraction=args.fraction)


def cmd_models(args) -> int:
    if args.admin_url is None:
        return _run(lambda: admin_actions.models_text(
            admin_actions.models(args.run_dir, args.store)))
    return _run(lambda: admin_actions.models_text(admin_client.Admin.of(args).models()))


def admin_arguments(p) -> None:
    """--admin-url and --admin-key-file: act through a server's admin route, not locally."""
    p.add_argument("--admin-url", metavar="URL",
                   help="act through the admin route at this URL (kiln serve --admin-port), "
                        f"with the admin key of ${admin_client.KEY_ENV} or --admin-key-file "
                        "(default: act locally, as the owner of --run-dir)")
    p.add_argument("--admin-key-file", type=Path, metavar="FILE",
                   help="a file only its owner may read, holding the admin key (default: "
                        f"${admin_client.KEY_ENV})")


def add_parsers(sub) -> None:
    """The version commands' parsers, on `kiln`'s subcommands."""
    p = sub.add_parser("deploy", help="build a new version and serve it beside the others",
                       description="Export the declaration's current weights (parity-gated), "
                                   "archive them as NAME-V.mar, register them beside the "
                                   "served versions without a restart, warm each worker, "
                                   "record the version in run/versions.json. The default "
                                   "stays as it is (kiln promote). Needs a server started "
                                   "with --enable-model-api.")
    p.add_argument("name", help="declared model (or NAME.toml path)")
    p.add_argument("--version", help="the version to deploy (default: the declaration's)")
    p.add_argument("--allow-signature-change", action="store_true",
                   help="deploy even if its inputs or outputs differ from the served "
                        "default's (default: refuse: its clients would break)")
    p.add_argument("--backend", choices=["onnx", "torchscript"],
                   help="exported form to archive (default: onnx)")
    declaration.add_models_dir(p)
    server_arguments(p)
    admin_arguments(p)
    p.set_defaults(func=cmd_deploy)
    for command, func, help_, with_version in (
            ("promote", cmd_promote, "make a deployed version the default", True),
            ("rollback", cmd_rollback, "make the previous default the default again", False),
            ("retire", cmd_retire, "unregister a version that is neither default nor last",
             True)):
        p = sub.add_parser(command, help=help_, description=help_[0].upper() + help_[1:] + ".")
        p.add_argument("name", help="served model")
        if with_version:
            p.add_argument("version", help="its version")
        server_arguments(p)
        admin_arguments(p)
        p.set_defaults(func=func)
    p = sub.add_parser("route", help="split a model's unpinned requests among its versions",
                       description="Record the weights (percent, adding up to 100) by which "
                                   "unpinned requests go to ready versions, in "
                                   "run/versions.json; no weights: all to the default.")
    p.add_argument("name", help="served model")
    p.add_argument("weights", nargs="*", metavar="VERSION=PERCENT",
                   help="say 1.0=90 2.0=10 (default: none, all to the default)")
    server_arguments(p)
    admin_arguments(p)
    p.set_defaults(func=cmd_route)
    p = sub.add_parser("shadow", help="have a version also score a sample of the requests",
                       description="Record that a ready version also scores this fraction of "
                                   "the unpinned requests routed elsewhere (its answers reach "
                                   "no client), in run/versions.json; 0 ends it.")
    p.add_argument("name", help="served model")
    p.add_argument("version", help="the shadowing version")
    p.add_argument("--fraction", type=float, required=True,
                   help="share of the routed requests, from 0 to 1 (0: stop shadowing)")
    server_arguments(p)
    admin_arguments(p)
    p.set_defaults(func=cmd_shadow)
    p = sub.add_parser("models", help="each served model's versions, default, route, shadows",
                       description="List run/versions.json with each version's ready workers.")
    server_arguments(p)
    admin_arguments(p)
    p.set_defaults(func=cmd_models)

