"""The `llama3gen` command line.

Exit status: 0 success; 1 `check` found a stale or edited repo, or an internal error (a bug: the
message asks for a report); 2 a user error (bad spec, infeasible budget, unwritable output, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from . import __version__
from .errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 1


def _plan_for(spec_path: str):
    from .planner import build_plan
    from .spec import field_where, load_spec
    spec, text = load_spec(spec_path)
    try:
        return build_plan(spec), text
    except UserError as exc:  # infeasible budget or constraints: the spec file is what to change
        # where the field is written (file:line:column), else the file
        exc.where = exc.where or (field_where(text, spec_path, exc.field) if exc.field
                                  else spec_path)
        raise


def cmd_solve(args) -> int:
    plan, _ = _plan_for(args.spec)
    if args.top is not None:
        plan = plan.model_copy(update={"variants": [
            v.model_copy(update={"top": [r for r in v.top if r.rank <= args.top or r.selected]})
            for v in plan.variants]})
    if args.json:
        print(json.dumps(plan.model_dump(mode="json"), sort_keys=True, indent=2))
    else:
        from .report import solve_report
        sys.stdout.write(solve_report(plan))
    return 0


def cmd_compile(args) -> int:
    from .render import render_files
    from .units import duration, si
    from .writer import InterruptedAfterWrite, write_repo
    plan, text = _plan_for(args.spec)
    out = Path(args.output) if args.output else Path(plan.name)
    files = render_files(plan, text)
    summary = write_repo(out, files, force=args.force)
    try:
        print(summary)
        for v in plan.variants:
            c, t = v.choice, v.timing
            print(f"  {v.name}: {c.shape.n_layers}L × {c.shape.d_model}, N {si(c.n_params)}, "
                  f"D {si(c.tokens)}, loss {c.loss:.4f}, {duration(t.wall_clock_days)} of wall "
                  f"clock -> config/{v.name}.py")
    except KeyboardInterrupt:
        raise InterruptedAfterWrite(f"the compile was complete: {summary}") from None
    return 0


def _refuse_named_files(text: str, repo: Path) -> None:
    """A spec that names files (a calibration, a fitted law) reads them relative to itself: the
    lock's copy of the spec does not say where that was, so check needs the spec file."""
    import yaml
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        return  # parse_spec_text reports it with a position
    hardware = data.get("hardware") if isinstance(data, dict) else None
    search = data.get("search") if isinstance(data, dict) else None
    named = [key for key, present in (
        ("hardware.calibration", isinstance(hardware, dict) and hardware.get("calibration")),
        ("search.scaling_law: {file}", isinstance(search, dict)
         and isinstance(search.get("scaling_law"), dict)
         and "file" in search["scaling_law"])) if present]
    if named:
        raise UserError(f"the spec in {repo}/llama3gen.lock.json names {' and '.join(named)}, a "
                        "file relative to the spec file, which the lock does not locate",
                        fix=f"llama3gen check {repo} --spec SPEC")


def cmd_check(args) -> int:
    from .render import read_lock, render_files
    from .spec import load_spec, parse_spec_text
    from .planner import build_plan
    from .writer import compare, diff, recovered
    repo = Path(args.repo)
    with recovered(repo):  # waits for a compile into repo; finishes or undoes a killed one
        lock = read_lock(repo)
        if args.spec:
            spec, text = load_spec(args.spec)
        else:
            text = lock.get("spec_text", "")
            _refuse_named_files(text, repo)
            spec = parse_spec_text(text, f"{repo}/llama3gen.lock.json#spec_text")
        files = render_files(build_plan(spec), text)
        state = compare(repo, files)
    if state.clean:
        print(f"{repo}: up to date ({len(files)} generated files)")
        return 0
    for label, paths in (("edited by hand", state.edited), ("stale", state.stale),
                         ("missing", state.missing), ("user file where a generated file goes",
                                                      state.collisions),
                         ("in the way", state.in_the_way),
                         ("no longer generated", state.obsolete),
                         ("no longer generated, edited by hand", state.obsolete_edited)):
        for p in paths:
            print(f"{label}: {p}")
    sys.stdout.write(diff(repo, files, state.edited + state.stale + state.collisions))
    print(f"{repo}: not up to date; run `llama3gen compile SPEC -o {repo}` to regenerate")
    return 1


def cmd_schema(args) -> int:
    from .spec import json_schema
    print(json.dumps(json_schema(), indent=2, sort_keys=True))
    return 0


def cmd_gpus(args) -> int:
    from .hardware import CATALOG
    print(f"{'name':<12} {'bf16 TFLOP/s':>13} {'memory GB':>10} {'default MFU':>12}  source")
    for key, g in CATALOG.items():
        print(f"{key:<12} {g.bf16_tflops:>13g} {g.memory_gb:>10g} {g.default_mfu:>12g}  {g.source}")
    return 0


def cmd_submit(args) -> int:
    from .submit import submit
    return submit(Path(args.repo), variant=args.variant, dry_run=args.dry_run,
                  use_sbatch=args.sbatch, overrides=args.overrides, sweep=args.sweep)


def cmd_fit(args) -> int:
    from . import fit
    target = args.target
    if args.spec:
        from .solver import budget_flops
        from .spec import load_spec
        target = budget_flops(load_spec(args.spec)[0]).flops
    if target is None:  # a generated repo knows the budget it was compiled for
        target = next((fit.repo_target(s) for s in args.sources if Path(s).is_dir()), None)
    runs, excluded = [], []
    for source in args.sources:
        got, bad = fit.read_source(source)
        runs += got
        excluded += bad
    runs, excluded = fit.select_runs(runs, excluded, args.exclude_worst, ", ".join(args.sources))
    result = fit.fit(runs, excluded, target_flops=target, bootstrap=args.bootstrap, seed=args.seed,
                     sources=", ".join(args.sources))
    if args.output:
        fit.write_law(Path(args.output), result)
    if args.svg:
        fit.write_svg(Path(args.svg), result)
    if args.json:
        print(json.dumps(result.to_json(), sort_keys=True, indent=2))
    else:
        sys.stdout.write(fit.report(result))
        if args.output:
            print(f"law written to {args.output}")
    return 0


def _flops(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of FLOPs; give e.g. 1e22")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give e.g. 2") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def cmd_calibrate(args) -> int:
    from .calibrate import calibrate, report, write_calibration, write_svg
    doc, _, _ = calibrate(Path(args.run_dir), args.variant)
    if args.output:
        write_calibration(Path(args.output), doc)
    if args.svg:
        write_svg(Path(args.svg), doc)
    if args.json:
        print(json.dumps(doc, sort_keys=True, indent=2))
    else:
        sys.stdout.write(report(doc))
        for label, path in (("calibration", args.output), ("figure", args.svg)):
            if path:
                print(f"wrote {label} {path}")
        if args.output:
            print(f"use it: `hardware: {{calibration: {args.output}}}` in a spec (a path relative "
                  "to the spec file), then `llama3gen compile`")
    return 0


def _nonempty_path(text: str) -> str:
    # An empty -o is falsy: it silently fell back to ./<name>. Refuse it, naming the option.
    if not text:
        raise argparse.ArgumentTypeError("an empty path; give a directory, e.g. -o runs/small")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give e.g. 10") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} shows no candidates; give 1 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama3gen", description="Compile a pre-training budget into a LLaMA-3 training repo.")
    parser.add_argument("--version", action="version", version=f"llama3gen {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("solve", help="solve a spec and print the decision")
    p.add_argument("spec")
    p.add_argument("--json", action="store_true", help="print the Plan as JSON")
    p.add_argument("--top", type=_positive_int, metavar="K", help="show the K best candidates")
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("compile", help="render the training repo for a spec")
    p.add_argument("spec")
    p.add_argument("-o", "--output", type=_nonempty_path, help="output directory (default: ./<name>)")
    p.add_argument("--force", action="store_true", help="overwrite hand-edited generated files")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("check", help="exit 1 with a diff if a generated repo is stale or edited")
    p.add_argument("repo")
    p.add_argument("--spec", help="compare against this spec (default: the one in the lock file)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("calibrate", help="compare a run's measured speed with its plan; write a "
                       "calibration file for the next plan")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's out_dir inside a generated repo")
    p.add_argument("--variant", help="the variant the run trained (default: the one of its shape)")
    p.add_argument("--json", action="store_true", help="print the calibration as JSON")
    p.add_argument("-o", "--output", type=_nonempty_path, metavar="CALIBRATION.json",
                   help="write the calibration file a spec names as hardware.calibration")
    p.add_argument("--svg", type=_nonempty_path, metavar="FILE",
                   help="write the loss and tokens/s against the plan as SVG")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("schema", help="print the spec's JSON Schema")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("gpus", help="list the GPU catalog")
    p.set_defaults(func=cmd_gpus)

    p = sub.add_parser("submit", help="submit a generated repo's job to SLURM",
                       usage="llama3gen submit REPO [--variant V | --sweep] [--dry-run] [--sbatch] "
                             "[-- --key=value ...]")
    p.add_argument("repo")
    p.add_argument("--variant", help="variant to train (default: the first)")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted")
    p.add_argument("--sbatch", action="store_true", help="use scripts/train.sbatch, not submitit")
    p.add_argument("--sweep", action="store_true",
                   help="submit the scaling-law sweep's unfinished runs (a job array) instead")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("fit", help="fit a scaling law on sweep runs (a generated repo, or CSV "
                                   "params,tokens,loss)")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="a generated repo with a sweep (its config/sweep and out/sweep), or a CSV: "
                        "params,tokens,loss[,flops]")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--target", type=_flops, metavar="FLOPS", help="budget to extrapolate to")
    where.add_argument("--spec", help="take the target budget from this spec")
    p.add_argument("--exclude-worst", type=_count, default=0, metavar="K",
                   help="drop the K highest-loss runs (named in the report)")
    p.add_argument("--bootstrap", type=_count, default=1000, metavar="B",
                   help="bootstrap resamples for the CIs (default 1000)")
    p.add_argument("--seed", type=_count, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--json", action="store_true", help="print the fit as JSON")
    p.add_argument("-o", "--output", type=_nonempty_path, metavar="LAW.json",
                   help="write the fitted law (for search.scaling_law: {file: LAW.json})")
    p.add_argument("--svg", type=_nonempty_path, metavar="FILE",
                   help="draw the runs, the fitted isoFLOP curves and the target's optimum")
    p.set_defaults(func=cmd_fit)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after `--` is for train.py (llama3gen submit REPO -- --max_iters=100).
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if overrides and args.command != "submit":
        parser.error(f"`--` and train.py overrides belong to `llama3gen submit`, not {args.command}")
    args.overrides = overrides
    try:
        return args.func(args)
    except UserError as exc:
        print(exc.render(), file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:  # InterruptedAfterWrite says what was written
        print(f"interrupted; {str(exc) or 'nothing was written'}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # a bug: say so, and how to report it
        if args.debug:
            traceback.print_exc()
        print(f"internal error: {type(exc).__name__}: {exc}\n"
              "  this is a bug in llama3gen; please report it with the spec and `--debug` output",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
