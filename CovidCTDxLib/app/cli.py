"""The ``covidctdx`` command line (contract in DESIGN.md).

Errors a user can act on (CovidCTDxError) are printed as one line without a traceback and
exit with status 2; Ctrl-C cancels cleanly with status 130 and writes nothing.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

from .. import __version__
from ..errors import CancelledError, CovidCTDxError
from ..progress import CancelToken

log = logging.getLogger("covidctdx")

EXIT_USER_ERROR = 2
EXIT_CANCELLED = 130


class ProgressPrinter:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last_message = ""
        self.start = time.perf_counter()

    def __call__(self, fraction: float, message: str) -> None:
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.start
        if self.tty:
            bar = "#" * int(30 * fraction)
            sys.stderr.write(f"\r[{bar:<30}] {100 * fraction:5.1f}% {elapsed:6.1f}s {message[:60]:<60}")
            if fraction >= 1.0:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif message != self.last_message:
            sys.stderr.write(f"[{100 * fraction:5.1f}% {elapsed:6.1f}s] {message}\n")
        self.last_message = message


# --------------------------------------------------------------------------- commands
def parse_triple(text: Optional[str], option: str, kind: type = float) -> Optional[tuple]:
    """``x,y,z`` → a 3-tuple (None when not given); one line on anything else."""
    if text is None:
        return None
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise CovidCTDxError(f"{option} needs three comma-separated numbers x,y,z, got {text!r}.")
    return values


def cmd_run(args: argparse.Namespace) -> int:
    from ..io.output_folder import OutputFolder
    from ..io.readers import read_ct
    from ..io.results import write_outputs
    from ..pipeline import PipelineOptions, parse_stages, run_pipeline
    from ..result import STAGES

    # Everything cheap that can refuse comes first: options, the output folder, then the CT.
    options = PipelineOptions(
        stages=parse_stages(args.stages) if args.stages is not None else STAGES,
        weights_dir=args.weights,
        lung_model=args.lung_model,
        lesion_source=args.lesion_source,
    )
    spacing = parse_triple(args.spacing, "--spacing")
    with OutputFolder(args.output) as folder:
        ct = read_ct(args.ct_path, series_uid=args.series_uid, spacing=spacing, resample_gaps=args.resample_gaps)
        result = run_pipeline(ct, options, progress=ProgressPrinter(args.quiet), cancel=args.cancel)
        files = write_outputs(result, folder, source=str(args.ct_path))
    _summarise(files["results.json"])
    return 0


def _summarise(results_json: Path) -> None:
    """Print the key results on stdout (scripts read results.json; people read this).

    Findings and the rule-based reading come first; each model line leads with "not
    assessable (out of distribution)" when its input is unlike its training scans, so a
    class or grade is never the first thing read for such a scan.
    """
    from ..io.report import classification_summary, severity_summary

    r = json.loads(results_json.read_text())
    out = [f"outputs: {results_json.parent}"]
    if r["lungs"]:
        out.append(f"lungs: right {r['lungs']['right_ml']:.0f} mL, left {r['lungs']['left_ml']:.0f} mL")
    f = r.get("findings")
    if f:
        plr = f["peripheral_lesion_ratio_percent"]
        out.append(
            f"findings: {f['lesion_count']} lesions, {f['lesion_volume_ml']:.1f} mL, LVR {f['lesion_volume_ratio_percent']:.1f}%, "
            f"PLR {plr if plr is not None else float('nan'):.1f}%, CT severity score {f['ct_severity_score']}"
        )
        reading = f.get("rule_based_reading")
        if reading:
            out.append(f"rule-based reading: {reading['label']} — {'; '.join(reading['reasons'])}")
    for key, title, summary in (("classification", "classification", classification_summary),
                                ("severity", "severity", severity_summary)):
        block = r.get(key)
        if block:
            label = block["weights"].get("label")
            out.append(f"{title}: {summary(block)}" + (f"  [{label}]" if label else ""))
        else:
            out.append(f"{title}: not run — {r['not_run'].get(key, '')}")
    out.append("timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in r["timings_s"].items()))
    print("\n".join(out))


def cmd_phantom(args: argparse.Namespace) -> int:
    from ..io.segmentation_file import write_segmentation, write_volume
    from ..synthetic.phantom import make_phantom

    # Both are x,y,z on the command line, like every spacing in CovidCTDx; make_phantom takes the shape as (z, y, x).
    shape_xyz = parse_triple(args.shape, "--shape", int)
    shape = tuple(reversed(shape_xyz)) if shape_xyz else None
    spacing = parse_triple(args.spacing, "--spacing")
    kwargs = {k: v for k, v in (("shape", shape), ("spacing", spacing)) if v is not None}
    start = time.perf_counter()
    ph = make_phantom(kind=args.kind, severity=args.severity, lvr_percent=args.lvr, seed=args.seed, **kwargs)
    elapsed = time.perf_counter() - start
    out = Path(args.out_path)
    write_volume(ph.ct, out)
    if args.truth:
        masks = {"right_lung": ph.right_lung, "left_lung": ph.left_lung, "airways": ph.airways, "lesion": ph.lesion,
                 "ggo": ph.lesion_type == 1, "consolidation": ph.lesion_type == 3}
        write_segmentation(ph.ct, masks, Path(args.truth))
    print(f"phantom: {out} ({args.kind}, {ph.severity or 'no lesions'}, LVR {ph.lvr_percent:.1f}%, "
          f"{' x '.join(str(n) for n in reversed(ph.ct.shape))} voxels (x, y, z), {elapsed:.1f} s)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Phantom → full pipeline → outputs, for a first look on any machine."""
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    ct_path = out / "demo_ct.nrrd"
    phantom_args = argparse.Namespace(kind=args.kind, severity=args.severity, lvr=None, seed=args.seed,
                                      shape=args.shape, spacing=args.spacing, out_path=str(ct_path),
                                      truth=str(out / "demo_truth.seg.nrrd"))
    cmd_phantom(phantom_args)
    run_args = argparse.Namespace(ct_path=str(ct_path), output=str(out), weights=args.weights, stages=None,
                                  lung_model=None, lesion_source="auto", series_uid=None, spacing=None,
                                  resample_gaps=False, quiet=args.quiet, cancel=args.cancel)
    return cmd_run(run_args)


def cmd_findings(args: argparse.Namespace) -> int:
    from ..findings.recompute import recompute_findings_files

    files = recompute_findings_files(Path(args.ct_path), Path(args.seg_path), Path(args.output),
                                     spacing=parse_triple(args.spacing, "--spacing"))
    _summarise(files["results.json"])
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.model == "deepsc":
        from ..training import train_deepsc as trainer
    else:
        from ..training import train_racnet as trainer
    train_args = trainer.build_parser().parse_args(args.train_args)
    return int(trainer.run(train_args) or 0)


# --------------------------------------------------------------------------- parser
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default, unless it has none or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False) or "default" in text:
            return text
        return super()._get_help_string(action) or text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covidctdx",
        description="Chest CT → lungs, lesions, COVID-19 classification, severity, findings.",
    )
    parser.add_argument("--version", action="version", version=f"covidctdx {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    # The same two flags after the subcommand; SUPPRESS keeps a flag given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log details")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress output")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common],
                              formatter_class=_HelpFormatter, **kwargs)

    spacing_help = ("voxel size x,y,z in mm replacing the header's; needed when the header has none "
                    "(refused otherwise), recorded as a warning")
    run = add("run", "run the pipeline on a CT file or DICOM folder")
    run.add_argument("ct_path", help=".nii/.nii.gz/.nrrd/.mha file or DICOM series folder")
    run.add_argument("-o", "--output", default="covidctdx_output", help="output folder (checked and locked before any work)")
    run.add_argument("--weights", type=Path, default=None,
                     help="existing folder with deepsc_*.safetensors / racnet_*.safetensors (default: the bundled demo weights)")
    run.add_argument("--lung-model", type=Path, default=None,
                     help="a lung U-Net .safetensors file (R231 layout, see CovidCTDxLib/lungs/model_hook.py) to use "
                          "instead of the classical lung engine; checked against its .sha256 sidecar")
    run.add_argument("--stages", default=None,
                     help="comma-separated subset of lungs,deepsc,racnet,findings, case and spaces ignored (default: all)")
    run.add_argument("--lesion-source", default="auto", choices=("auto", "deepsc", "density"),
                     help="where the findings' lesions come from: auto = DeepSC-COVID with weights trained on real "
                          "data, else the density engine; deepsc or density force one")
    run.add_argument("--series-uid", default=None, help="pick one CT series in a folder holding several")
    run.add_argument("--spacing", default=None, help=spacing_help)
    run.add_argument("--resample-gaps", action="store_true",
                     help="DICOM with missing slices: interpolate onto the true slice positions instead of refusing "
                          "(gaps recorded in results.json and the report)")
    run.set_defaults(func=cmd_run)

    ph = add("phantom", "write a synthetic chest CT phantom")
    ph.add_argument("out_path", help="output volume (.nrrd/.nii.gz/.mha)")
    ph.add_argument("--kind", default="covid", choices=("covid", "cap", "normal"))
    ph.add_argument("--severity", default=None, choices=("mild", "moderate", "severe", "critical"))
    ph.add_argument("--lvr", type=float, default=None, help="lesion volume ratio in percent (overrides --severity)")
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--shape", default=None, help="x,y,z voxels (same order as --spacing), e.g. 512,512,300")
    ph.add_argument("--spacing", default=None, help="x,y,z mm, e.g. 0.7,0.7,1.0")
    ph.add_argument("--truth", default=None, help="also write the ground truth as this .seg.nrrd")
    ph.set_defaults(func=cmd_phantom)

    demo = add("demo", "phantom → pipeline → outputs")
    demo.add_argument("-o", "--output", default="demo_output", help="output folder")
    demo.add_argument("--kind", default="covid", choices=("covid", "cap", "normal"))
    demo.add_argument("--severity", default="moderate", choices=("mild", "moderate", "severe", "critical"))
    demo.add_argument("--seed", type=int, default=2026)
    demo.add_argument("--shape", default=None, help="x,y,z voxels of the phantom")
    demo.add_argument("--spacing", default=None, help="x,y,z mm of the phantom")
    demo.add_argument("--weights", type=Path, default=None, help="weights folder (default: the bundled demo weights)")
    demo.set_defaults(func=cmd_demo)

    fi = add("findings", "recompute findings from an (edited) seg.nrrd")
    fi.add_argument("ct_path", help="the CT the segmentation was made on")
    fi.add_argument("seg_path", help="segmentation.seg.nrrd (as written by run, or saved from Slicer)")
    fi.add_argument("-o", "--output", default="covidctdx_findings",
                    help="output folder; a run's folder keeps that run's classification, severity and evidence")
    fi.add_argument("--spacing", default=None, help=spacing_help)
    fi.set_defaults(func=cmd_findings)

    tr = add("train", "train a model (see `covidctdx train deepsc --help`)")
    tr.add_argument("model", choices=("deepsc", "racnet"), help="the model to train; its options follow it")
    tr.add_argument("train_args", nargs=argparse.REMAINDER, help="the trainer's options")
    tr.set_defaults(func=cmd_train)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args.cancel = CancelToken()
    try:
        return args.func(args)
    except CancelledError as exc:
        print(f"covidctdx: {exc}", file=sys.stderr)
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        args.cancel.cancel()
        print("covidctdx: cancelled by the user; no results were written.", file=sys.stderr)
        return EXIT_CANCELLED
    except CovidCTDxError as exc:
        print(f"covidctdx: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
