"""``retrain-server``: keys, training, evaluation. Only here is logging configured."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

_LOG = logging.getLogger("retrain_server")


def _cmd_keygen(args: argparse.Namespace) -> int:
    from .sign import keygen

    key, pub = keygen(args.out)
    print(f"wrote {key} (private, mode 600) and {pub}")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from . import synth

    argv = ["--out", str(args.out), "--seed", str(args.seed)]
    if args.large:
        argv.append("--large")
    return synth.main(argv)


def _cmd_train(args: argparse.Namespace) -> int:
    for flag in ("products", "purchases"):
        if not getattr(args, flag).is_file():
            raise SystemExit(f"retrain-server train: --{flag}: no such file {getattr(args, flag)}")
    if args.signing_key is None and not args.allow_unsigned:
        raise SystemExit("retrain-server train: --signing-key is required "
                         "(or --allow-unsigned for development)")
    if args.epochs is not None and args.epochs < 1:
        raise SystemExit("retrain-server train: --epochs must be at least 1")
    if args.signing_key is not None and not args.signing_key.is_file():
        raise SystemExit(f"retrain-server train: --signing-key: no such file {args.signing_key}")
    from .train import train_bundle

    doc = train_bundle(args.products, args.purchases, args.out, args.signing_key,
                       member=not args.guest_only, epochs=args.epochs, checkpoint_dir=args.checkpoint_dir)
    print(f"trained parameters {doc['version']} -> {args.out} "
          f"({len(doc['files'])} files, models: {', '.join(doc['models'])})")
    return 0


def _cmd_evaluate(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from . import evaluate

    return evaluate.main(list(rest))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="retrain-server",
                                 description="Smart Basket training server: keys, training, evaluation.")
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("keygen", help="write an Ed25519 key pair (signing.key, signing.pub)")
    p.add_argument("--out", type=Path, required=True, help="directory for the key files")
    p.set_defaults(func=_cmd_keygen)

    p = sub.add_parser("train", help="full training of both models from the seed's files")
    p.add_argument("--products", type=Path, required=True, help="products.csv")
    p.add_argument("--purchases", type=Path, required=True, help="purchase_history.jsonl")
    p.add_argument("--out", type=Path, required=True, help="parameters directory to write")
    p.add_argument("--signing-key", type=Path, help="Ed25519 private key (retrain-server keygen)")
    p.add_argument("--allow-unsigned", action="store_true", help="development: write an unsigned manifest")
    p.add_argument("--guest-only", action="store_true", help="skip the member (Two-Tower) model")
    p.add_argument("--epochs", type=int, help="member model epochs (default 3; the seed used 1)")
    p.add_argument("--checkpoint-dir", type=Path,
                   help="where the member model's TF checkpoint goes (default: OUT.checkpoint, beside the bundle)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("synth", help="write a synthetic store in the seed's formats")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--large", action="store_true", help="50,000 products, 1,000,000 rows")
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("evaluate", add_help=False,
                       help="Complete Journey evaluation (see 'retrain-server evaluate --help')")
    p.set_defaults(func=None)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    args, rest = ap.parse_known_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "evaluate":
        return _cmd_evaluate(args, rest)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.func(args))
    except (OSError, ValueError) as exc:  # DataError is a ValueError; FileExistsError an OSError
        print(f"retrain-server {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
