"""The admin actions on a model's versions, as one function each: `kiln deploy`, `route`,
`shadow`, `promote`, `rollback`, `retire` and `models` call them locally, Kiln's admin service
(deploy/admin_service.py) calls the same ones for a request on the admin port. Each returns
what it did, for the user; a refusal raises VersionsError (Busy while another action holds
versions.json's lock), a failure LifecycleError, and either leaves the service as it was.
"""

from __future__ import annotations

from pathlib import Path

from kiln import declaration
from kiln.deploy import lifecycle, shadowing, versions
from kiln.deploy.ports import HOST, Ports

BACKENDS = ("onnx", "torchscript")


def target(run_dir: Path, store: Path) -> lifecycle.Target:
    return lifecycle.Target.of(run_dir.resolve(), store.resolve())


def deploy(run_dir: Path, store: Path, name: str, models_dirs: list[Path],
           v: str | None = None, backend: str | None = None,
           allow_signature_change: bool = False) -> str:
    decl = declaration.get(name, models_dirs)
    served = target(run_dir, store)  # before anything is built: a server to deploy into

    def build(version: str) -> Path:
        # Imported only to build: it brings torch and the training code.
        from kiln.model_store.build import ensure_built

        return ensure_built(decl.name, backend, served.store, models_dirs, version)

    return lifecycle.deploy(served, decl, v or decl.version, build, allow_signature_change)


def promote(run_dir: Path, store: Path, name: str, v: str) -> str:
    return lifecycle.promote(target(run_dir, store), name, v)


def rollback(run_dir: Path, store: Path, name: str) -> str:
    return lifecycle.rollback(target(run_dir, store), name)


def retire(run_dir: Path, store: Path, name: str, v: str) -> str:
    return lifecycle.retire(target(run_dir, store), name, v)


def route(run_dir: Path, name: str, weights: dict[str, float] | None) -> str:
    with versions.transaction(run_dir) as state:
        versions.set_route(state, name, weights)
    shown = ", ".join(f"{v}={w:g}" for v, w in weights.items()) if weights else "default"
    return f"{name}: unpinned requests follow {shown}"


def shadow(run_dir: Path, name: str, v: str, fraction: float) -> str:
    with versions.transaction(run_dir) as state:
        versions.set_shadow(state, name, v, fraction)
    if fraction == 0:
        return f"{name} {v} shadows nothing"
    return f"{name} {v} shadows {fraction:g} of the routed requests"


# -- kiln models ----------------------------------------------------------------------------------
def models(run_dir: Path, store: Path) -> dict:
    """Per model and version: its archive, state, ready workers, and whether it is the
    default, the previous one, its route weight and shadow fraction; then each shadow's
    comparison with the versions it shadowed, since the server started. JSON-ready: the admin
    service answers it as it is, and models_text prints it."""
    state = versions.load(run_dir)
    if not state:
        return {"versions": [], "shadows": []}
    served_by = target(run_dir, store)
    rows = []
    for name, entry in sorted(state.items()):
        served = served_by.management.served(name)
        route_ = versions.route(state, name)
        for v, info in sorted(entry["versions"].items()):
            workers = served.get(v, {}).get("workers", [])
            rows.append({
                "model": name, "version": v, "state": info["state"],
                "ready_workers": sum(w.get("status") == "READY" for w in workers),
                "workers": len(workers),
                "role": ("default" if v == route_.default
                         else "previous" if v == entry["previous"] else ""),
                "weight": (route_.weights.get(v, 0) if route_.weights is not None
                           else 100 if v == route_.default else 0),
                "shadow": route_.shadows.get(v), "archive": info["archive"]})
    ports = Ports.saved(run_dir)
    figures = shadowing.read(f"http://{HOST}:{ports.metrics}") if ports else {}
    return {"versions": rows,
            "shadows": [{"model": name, "version": v, "comparison": f.line()}
                        for (name, v), f in sorted(figures.items())]}


def models_text(listing: dict) -> str:
    """`models`' listing as `kiln models` prints it."""
    if not listing["versions"]:
        return "no versions deployed (run/versions.json is empty): kiln deploy NAME"
    lines = [f"{'model':<12} {'version':<9} {'state':<8} {'workers':<8} {'role':<9} "
             f"{'weight':<7} {'shadow':<7} archive"]
    for r in listing["versions"]:
        workers = f"{r['ready_workers']}/{r['workers']}"
        shadow_ = "" if r["shadow"] is None else r["shadow"]
        lines.append(f"{r['model']:<12} {r['version']:<9} {r['state']:<8} {workers:<8} "
                     f"{r['role']:<9} {r['weight']:<7g} {shadow_!s:<7} {r['archive']}")
    if listing["shadows"]:
        lines += ["", "shadow comparisons (since the server started):"]
        lines += [f"{s['model']} {s['version']}: {s['comparison']}" for s in listing["shadows"]]
    return "\n".join(lines)
