"""``qsmprep-train``: pre-train the adaptive U-Net on synthetic data, or fine-tune it on yours.

Subcommands:

- ``pretrain --out DIR``: synthetic pre-training (:func:`qsmprep.nn.train.pretrain`).
  Re-running the same command resumes from ``DIR/checkpoint.pt``; ``--time-limit`` and
  SIGINT/SIGTERM stop cleanly after the current step with the checkpoint saved. The
  finished run writes ``DIR/model.pt`` and its model card ``DIR/model.json``.
  ``--checkpoint FILE`` keeps the checkpoint elsewhere (e.g. on scratch space shared by
  jobs that train in parts); ``--finish-by`` ends the run at a time budget with the
  weights written.
- ``transfer DERIVATIVES --out FILE.pt``: transfer learning on (local field, reference
  chi) pairs of a BIDS derivatives folder (:func:`qsmprep.nn.transfer.transfer_learn`).
- ``curves RUN [RUN ...] --out FILE.png``: training loss and validation NRMSE of run
  folders, from their ``history.jsonl``.
- ``ablate MODEL [MODEL ...] --out FILE.json``: validation NRMSE of each model with the
  right and with wrong side information (:func:`qsmprep.nn.train.side_ablation`), on
  validation pairs made as its model card's training data.

Exit codes: 0 done (or stopped cleanly with a checkpoint), 1 failure, 64 usage error,
130 aborted by a second interrupt.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_ABORT = 0, 1, 64, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors exit 64, not argparse's 2
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _patch(values: Sequence[int]) -> tuple[int, int, int]:
    if len(values) == 1:
        return (values[0],) * 3
    if len(values) == 3:
        return tuple(values)
    raise argparse.ArgumentTypeError("give one size (a cube) or three")


def build_parser() -> argparse.ArgumentParser:
    """The ``qsmprep-train`` argument parser."""
    from qsmprep.nn.synth import SynthConfig
    from qsmprep.nn.train import TrainConfig
    from qsmprep.nn.transfer import TransferConfig
    from qsmprep.nn.unet import INPUT_TRANSFORMS

    t, s, x = TrainConfig(), SynthConfig(), TransferConfig()
    parser = _Parser(
        prog="qsmprep-train",
        description="Train qsmprep's adaptive U-Net for QSM dipole inversion.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    common = _Parser(add_help=False)
    common.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    common.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    common.add_argument("--seed", type=int, default=0, help="random seed (data and init)")
    common.add_argument("--batch-size", type=int, default=t.batch_size)
    common.add_argument(
        "--dc-weight", type=float, default=0.0, help="weight of the L1 dipole-consistency term"
    )
    common.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser(
        "pretrain",
        parents=[common],
        help="pre-train on synthetic pairs (resumable)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="run folder (checkpoint, history, model.pt)")
    p.add_argument("--steps", type=int, default=t.steps, help="total optimisation steps")
    p.add_argument(
        "--patch-size", type=int, nargs="+", default=[s.patch_size[0]], metavar="N",
        help="patch size in voxels (one or three; multiples of 2**(depth-1))",
    )  # fmt: skip
    p.add_argument("--lr", type=float, default=t.lr, help="AdamW peak learning rate")
    p.add_argument("--min-lr", type=float, default=t.min_lr, help="cosine minimum lr")
    p.add_argument("--weight-decay", type=float, default=t.weight_decay)
    p.add_argument(
        "--restart-steps", type=int, default=t.restart_steps, help="first cosine cycle (steps)"
    )
    p.add_argument("--restart-mult", type=int, default=t.restart_mult, help="cycle growth")
    p.add_argument("--base-channels", type=int, default=t.base_channels)
    p.add_argument("--depth", type=int, default=t.depth, help="U-Net levels")
    p.add_argument(
        "--no-adaptive", action="store_true", help="plain U-Net baseline (no adaptive layer)"
    )
    p.add_argument(
        "--input-transform",
        choices=INPUT_TRANSFORMS,
        default=t.input_transform,
        help="network input: the local field (none, as in the paper) or its TKD inversion "
        "with each sample's dipole kernel (tkd), which the U-Net then refines",
    )
    p.add_argument("--val-every", type=int, default=t.val_every, help="steps between validations")
    p.add_argument("--val-pairs", type=int, default=t.val_pairs, help="validation pairs")
    p.add_argument("--checkpoint-every", type=int, default=t.checkpoint_every)
    p.add_argument(
        "--workers", type=int, default=t.workers,
        help="data-generation processes (0: in the training process); batches are the same",
    )  # fmt: skip
    p.add_argument("--head-prob", type=float, default=s.head_prob, help="share of head patches")
    p.add_argument("--pool-size", type=int, default=s.pool_size, help="head phantoms per split")
    p.add_argument("--max-tilt", type=float, default=s.max_tilt_deg, help="largest B0 tilt (deg)")
    p.add_argument(
        "--voxel-size-range", type=float, nargs=2, default=list(s.voxel_size_range),
        metavar=("LO", "HI"), help="voxel sizes drawn in this range (mm)",
    )  # fmt: skip
    p.add_argument(
        "--time-limit", type=float, default=None, metavar="HOURS",
        help="stop cleanly after this many hours (run the command again to continue)",
    )  # fmt: skip
    p.add_argument(
        "--finish-by", type=float, default=None, metavar="HOURS",
        help="end the run after this many hours as if --steps were reached: the weights and "
        "card are written (the card notes the planned steps); the checkpoint is kept",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint", default=None, metavar="FILE",
        help="the checkpoint to write and resume from (default: OUT/checkpoint.pt); not "
        "inside the qsmprep package",
    )  # fmt: skip
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--fp16", action="store_true", help="store the final weights in fp16")

    r = sub.add_parser(
        "transfer",
        parents=[common],
        help="transfer learning on your own (local field, chi) pairs",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    r.add_argument("derivatives", help="BIDS derivatives folder with the pairs")
    r.add_argument("--out", required=True, help="new weights file (.pt; card next to it)")
    r.add_argument(
        "--base-model", default=None, help="weights to start from (default: the bundled model)"
    )
    r.add_argument(
        "--reference-desc", default=None, metavar="LABEL",
        help="use *_desc-LABEL_Chimap as the reference chi (e.g. COSMOS)",
    )  # fmt: skip
    r.add_argument("--steps", type=int, default=x.steps)
    r.add_argument("--patch-size", type=int, nargs="+", default=[x.patch_size[0]], metavar="N")
    r.add_argument("--lr-decoder", type=float, default=x.lr_decoder)
    r.add_argument("--lr-rest", type=float, default=x.lr_rest, help="lr of the encoder etc.")
    r.add_argument(
        "--val-subject", action="append", default=[], metavar="LABEL",
        help="hold this subject out for validation (repeatable)",
    )  # fmt: skip
    r.add_argument("--fp16", action="store_true", help="store the weights in fp16")

    c = sub.add_parser(
        "curves",
        help="plot training loss and validation NRMSE of run folders",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument("runs", nargs="+", help="run folders (with history.jsonl)")
    c.add_argument("--out", required=True, help="PNG file to write")

    a = sub.add_parser(
        "ablate",
        help="validation NRMSE with right and wrong side information",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a.add_argument("models", nargs="+", help="model files (.pt with their .json cards)")
    a.add_argument("--out", required=True, help="JSON file to write")
    a.add_argument("--pairs", type=int, default=32, help="validation pairs")
    a.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return parser


def _pretrain(args: argparse.Namespace, command: str) -> int:
    import torch

    from qsmprep.nn.synth import SynthConfig
    from qsmprep.nn.train import TrainConfig, pretrain

    synth = SynthConfig(
        patch_size=_patch(args.patch_size),
        head_prob=args.head_prob,
        pool_size=args.pool_size,
        max_tilt_deg=args.max_tilt,
        voxel_size_range=tuple(args.voxel_size_range),
    )
    cfg = TrainConfig(
        out_dir=args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        restart_steps=args.restart_steps,
        restart_mult=args.restart_mult,
        dc_weight=args.dc_weight,
        base_channels=args.base_channels,
        depth=args.depth,
        adaptive=not args.no_adaptive,
        input_transform=args.input_transform,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        val_every=args.val_every,
        val_pairs=args.val_pairs,
        checkpoint_every=args.checkpoint_every,
        workers=args.workers,
        synth=synth,
    )
    res = pretrain(
        cfg,
        resume=not args.restart,
        progress=not args.no_progress,
        command=command,
        time_limit_s=None if args.time_limit is None else args.time_limit * 3600,
        weights_dtype=torch.float16 if args.fp16 else torch.float32,
        checkpoint=args.checkpoint,
        finish_by_s=None if args.finish_by is None else args.finish_by * 3600,
    )
    if res is None:
        print(f"stopped with a checkpoint in {args.out}; run the same command to continue")
    else:
        nrmse = res.validation.get("nrmse", float("nan"))
        ref = res.reference.get("nrmse", float("nan"))
        print(
            f"wrote {res.weights} after {res.step} steps; validation NRMSE {nrmse:.1f} % "
            f"(TKD on the same pairs: {ref:.1f} %)"
        )
    return EXIT_OK


def _transfer(args: argparse.Namespace, command: str) -> int:
    from qsmprep.nn.transfer import TransferConfig, discover_pairs, transfer_learn

    cfg = TransferConfig(
        out=args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        patch_size=_patch(args.patch_size),
        lr_decoder=args.lr_decoder,
        lr_rest=args.lr_rest,
        dc_weight=args.dc_weight,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        val_subjects=tuple(v.removeprefix("sub-") for v in args.val_subject),
        reference_desc=args.reference_desc,
        fp16=args.fp16,
    )
    pairs = discover_pairs(args.derivatives, args.reference_desc)
    print(f"{len(pairs)} pairs: " + ", ".join(p.key for p in pairs))
    res = transfer_learn(
        args.base_model, pairs, cfg, command=command, progress=not args.no_progress
    )
    nrmse = res.validation.get("nrmse")
    tail = f"; validation NRMSE {nrmse:.1f} %" if nrmse is not None else ""
    print(f"wrote {res.weights}{tail}")
    return EXIT_OK


def _ablate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from qsmprep.nn.inference import resolve_device
    from qsmprep.nn.synth import SynthConfig, SyntheticQSMDataset
    from qsmprep.nn.train import side_ablation
    from qsmprep.nn.weights import load_card, load_model

    if args.pairs < 1:
        raise ValueError(f"--pairs must be >= 1, got {args.pairs}")
    device = resolve_device(args.device)
    results = {}
    for path in args.models:
        card = load_card(path)
        synth = SynthConfig.from_dict(card.get("data", {}).get("synth", SynthConfig().to_dict()))
        seed = int(card.get("training", {}).get("seed", 0))
        batches = SyntheticQSMDataset(synth, "val", seed, length=args.pairs, batch_size=1)
        results[path] = side_ablation(load_model(path), batches, device)
        r = results[path]
        print(f"{path}: NRMSE right {r['right']:.2f} %, wrong side to the adaptive layer "
              f"{r['wrong_adaptive']:.2f} % ({r['pairs']} validation pairs)")  # fmt: skip
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``qsmprep-train``; returns the exit code (see the module doc)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in ("pretrain", "transfer"):
            _patch(args.patch_size)
    except argparse.ArgumentTypeError as e:
        parser.error(f"--patch-size: {e}")
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    command = shlex.join(["qsmprep-train", *argv])
    try:
        if args.command == "pretrain":
            return _pretrain(args, command)
        if args.command == "curves":
            from qsmprep.nn.train import plot_history

            print(f"wrote {plot_history(args.runs, args.out)}")
            return EXIT_OK
        if args.command == "ablate":
            return _ablate(args)
        return _transfer(args, command)
    except KeyboardInterrupt:
        print("qsmprep-train: aborted", file=sys.stderr)
        return EXIT_ABORT
    except (ValueError, FloatingPointError, OSError) as e:
        print(f"qsmprep-train: error: {e}", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
