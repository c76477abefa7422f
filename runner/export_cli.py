"""``ftadvisor export SPEC.json --output DIR [--zip]``: write a portable run bundle (see runner/launch/export.py)."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    """Add ``export`` to the ``ftadvisor`` parser."""
    p = subparsers.add_parser(
        "export", help="write a bundle (spec, launch script, engine configs, SLURM script) to run a spec elsewhere",
        description="Write a folder that runs the spec on a cluster without this app: spec.json, launch.sh "
                    "(torchrun / accelerate launch), engine configs, pinned requirements.txt, slurm.sbatch, README.")
    p.add_argument("spec", metavar="SPEC.json", help="a run spec (e.g. a run folder's spec.json)")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="bundle folder to write (new or empty)")
    p.add_argument("--zip", action="store_true", help="also write DIR.zip")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    p.add_argument("--gpu", metavar="ID", help="GPU catalog id: put this spec's per-GPU memory estimate in the README")
    p.set_defaults(func=export_command)


def export_command(args) -> int:
    from runner.errors import RunnerError
    from runner.launch.export import export_bundle
    from runner.spec import RunSpec

    spec_path = Path(args.spec).expanduser()
    if spec_path.is_dir() and (spec_path / "spec.json").is_file():
        spec_path = spec_path / "spec.json"
    if not spec_path.is_file():
        raise RunnerError(f"spec file {spec_path} does not exist", field="spec",
                          fix="give the path of a spec.json (a run folder holds one)")
    spec = RunSpec.load(spec_path)
    _check_model_name(spec.model)
    result = export_bundle(spec, Path(args.output), zip=args.zip, overwrite=args.force, gpu=args.gpu)
    folder = Path(args.output).expanduser().resolve()
    print(f"bundle: {folder}")
    if args.zip:
        print(f"zip:    {result}")
    print(f"run it: cd {folder} && pip install -r requirements.txt && ./launch.sh")
    return 0


def _check_model_name(ref: str) -> None:
    """The bundle runs elsewhere, so the weights need not be here, but the name must be one the runner's model
    resolution knows (runner.models): a catalog id with released weights, a hub id, or a folder. An absolute
    path passes even when missing here (it may be a folder on the cluster; the bundle's README says so)."""
    from runner.models import parse_model_ref

    if Path(ref).is_absolute():
        return
    parse_model_ref(ref)  # a RunnerError: the dispatcher prints its message and its fix
