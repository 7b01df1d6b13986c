"""The ``alsquant`` command line."""

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .errors import InputError

log = logging.getLogger("alsquant")


def _print_progress(fraction, message):
    print(f"[{fraction * 100:5.1f}%] {message}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# simulate
# ----------------------------------------------------------------------------------------------------------------
def _add_simulate(subparsers):
    p = subparsers.add_parser("simulate", help="simulate an ALS/control cohort as a BIDS-like dataset")
    p.add_argument("--subjects", type=int, default=10, help="number of subjects (default 10)")
    p.add_argument("--out", required=True, type=Path, help="output folder (new or empty)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--als-fraction", type=float, default=0.5, help="fraction of ALS subjects (default 0.5)")
    p.add_argument("--snr", type=float, default=None, help="DWI SNR: white-matter b0 / noise SD (default 30)")
    p.add_argument("--gre-snr", type=float, default=None, help="GRE SNR at the first echo (default 40)")
    p.add_argument(
        "--echo-times", type=float, nargs="+", default=None, help="GRE echo times in seconds (default 0.015)"
    )
    p.add_argument("--gre-tilt", type=float, default=None, help="GRE slice obliquity in degrees (default 0)")
    p.add_argument(
        "--resolution",
        choices=("small", "study"),
        default="small",
        help="small grids for tests (default) or the study's (DWI 256x256x28, GRE 512x512x50)",
    )
    p.set_defaults(run=_run_simulate)


def _phantom_config(args):
    from . import phantom

    base = phantom.PhantomConfig.study() if args.resolution == "study" else phantom.PhantomConfig()
    echo_times = tuple(args.echo_times) if args.echo_times else None
    return phantom.with_overrides(
        base, snr_dwi=args.snr, snr_gre=args.gre_snr, echo_times=echo_times, gre_tilt_deg=args.gre_tilt
    )


def _run_simulate(args):
    from . import phantom

    rows = phantom.simulate_cohort(
        args.out,
        args.subjects,
        seed=args.seed,
        als_fraction=args.als_fraction,
        config=_phantom_config(args),
        progress=_print_progress,
    )
    n_als = sum(row["group"] == "ALS" for row in rows)
    print(f"{len(rows)} subjects ({n_als} ALS, {len(rows) - n_als} control) in {args.out}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------------------------------
def _add_demo(subparsers):
    p = subparsers.add_parser("demo", help="simulate a cohort and run every pipeline stage that exists on it")
    p.add_argument("--out", type=Path, default=Path("alsquant-demo"), help="output folder (default ./alsquant-demo)")
    p.add_argument("--als", type=int, default=20, help="ALS subjects (default 20)")
    p.add_argument("--controls", type=int, default=15, help="control subjects (default 15)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run_demo)


def _run_demo(args):
    from . import demo

    return demo.run(args.out, n_als=args.als, n_controls=args.controls, seed=args.seed, progress=_print_progress)


# ----------------------------------------------------------------------------------------------------------------
def build_parser():
    parser = argparse.ArgumentParser(
        prog="alsquant", description="ALS imaging biomarkers: DKI, QSM, atlas labelling and ROC diagnosis."
    )
    parser.add_argument("--version", action="version", version=f"alsquant {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_simulate, _add_demo):
        add(subparsers)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.run(args)
    except InputError as err:
        print(f"alsquant {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
