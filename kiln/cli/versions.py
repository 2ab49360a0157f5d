"""`kiln deploy`, `promote`, `rollback`, `retire` and `models`: versions of a served model."""

from __future__ import annotations

import logging

from kiln import declaration
from kiln.cli.serve import server_arguments
from kiln.deploy import lifecycle, shadowing, versions
from kiln.deploy.ports import HOST, Ports

log = logging.getLogger("kiln")


def _target(args) -> lifecycle.Target:
    return lifecycle.Target.of(args.run_dir.resolve(), args.store.resolve())


def _run(action) -> int:
    """The action's line printed; a refusal or failure logged, exit 1."""
    try:
        print(action())
    except (versions.VersionsError, lifecycle.LifecycleError, declaration.DeclarationError,
            OSError) as err:
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


def cmd_deploy(args) -> int:
    def action() -> str:
        decl = declaration.get(args.name, args.models_dirs)
        target = _target(args)  # before anything is built: a server to deploy into

        def build(v: str):
            # Imported only to build: it brings torch and the training code.
            from kiln.model_store.build import ensure_built

            return ensure_built(decl.name, args.backend, target.store, args.models_dirs, v)

        return lifecycle.deploy(target, decl, args.version or decl.version, build,
                                args.allow_signature_change)

    return _run(action)


def cmd_promote(args) -> int:
    return _run(lambda: lifecycle.promote(_target(args), args.name, args.version))


def cmd_rollback(args) -> int:
    return _run(lambda: lifecycle.rollback(_target(args), args.name))


def cmd_retire(args) -> int:
    return _run(lambda: lifecycle.retire(_target(args), args.name, args.version))


def cmd_route(args) -> int:
    def action() -> str:
        weights = parse_weights(args.weights) if args.weights else None
        with versions.transaction(args.run_dir) as state:
            versions.set_route(state, args.name, weights)
        shown = ", ".join(f"{v}={w:g}" for v, w in weights.items()) if weights else "default"
        return f"{args.name}: unpinned requests follow {shown}"

    return _run(action)


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
    def action() -> str:
        with versions.transaction(args.run_dir) as state:
            versions.set_shadow(state, args.name, args.version, args.fraction)
        if args.fraction == 0:
            return f"{args.name} {args.version} shadows nothing"
        return f"{args.name} {args.version} shadows {args.fraction:g} of the routed requests"

    return _run(action)


def cmd_models(args) -> int:
    return _run(lambda: models_table(_target(args)))


def models_table(target: lifecycle.Target) -> str:
    """Per model and version: its archive, state, ready workers, and whether it is the
    default, the previous one, its route weight and shadow fraction."""
    state = versions.load(target.run_dir)
    if not state:
        return "no versions deployed (run/versions.json is empty): kiln deploy NAME"
    lines = [f"{'model':<12} {'version':<9} {'state':<8} {'workers':<8} {'role':<9} "
             f"{'weight':<7} {'shadow':<7} archive"]
    for name, entry in sorted(state.items()):
        served = target.management.served(name)
        route = versions.route(state, name)
        for v, info in sorted(entry["versions"].items()):
            workers = served.get(v, {}).get("workers", [])
            ready = sum(w.get("status") == "READY" for w in workers)
            role = ("default" if v == route.default
                    else "previous" if v == entry["previous"] else "")
            weight = (route.weights.get(v, 0) if route.weights is not None
                      else 100 if v == route.default else 0)
            shadow = route.shadows.get(v, "")
            lines.append(f"{name:<12} {v:<9} {info['state']:<8} {f'{ready}/{len(workers)}':<8} "
                         f"{role:<9} {weight:<7g} {shadow!s:<7} {info['archive']}")
    return "\n".join(lines + shadow_lines(target))


def shadow_lines(target: lifecycle.Target) -> list[str]:
    """Each shadow's comparison with the versions it shadowed, since the server started."""
    ports = Ports.saved(target.run_dir)
    figures = shadowing.read(f"http://{HOST}:{ports.metrics}") if ports else {}
    return (["", "shadow comparisons (since the server started):"]
            + [f"{name} {v}: {f.line()}" for (name, v), f in sorted(figures.items())]
            if figures else [])


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
        p.set_defaults(func=func)
    p = sub.add_parser("route", help="split a model's unpinned requests among its versions",
                       description="Record the weights (percent, adding up to 100) by which "
                                   "unpinned requests go to ready versions, in "
                                   "run/versions.json; no weights: all to the default.")
    p.add_argument("name", help="served model")
    p.add_argument("weights", nargs="*", metavar="VERSION=PERCENT",
                   help="say 1.0=90 2.0=10 (default: none, all to the default)")
    server_arguments(p)
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
    p.set_defaults(func=cmd_shadow)
    p = sub.add_parser("models", help="each served model's versions, default, route, shadows",
                       description="List run/versions.json with each version's ready workers.")
    server_arguments(p)
    p.set_defaults(func=cmd_models)

