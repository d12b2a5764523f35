"""The ``dgdlens`` command line.

::

    dgdlens demo [--out dgdlens-demo]                        # the whole pipeline on bundled data
    dgdlens train DATA.h5ad --out MODEL/                     # fit a DGD to raw counts
    dgdlens embed MODEL/ NEW.h5ad --out OUT.h5ad             # latents + mixture clusters of new cells
    dgdlens sae EMBEDDINGS --out SAE/                        # sparse autoencoder on latents
    dgdlens annotate --activations A --expression DATA.h5ad --out features.csv
    dgdlens steer MODEL/ SAE/ DATA.h5ad --feature 3 --value 5 --out steer/

Every option can also come from a TOML file (``--config run.toml``): keys at the top level apply to
every command that has that option, keys in a ``[train]``, ``[embed]``, ... table to that command
only; options given on the command line win. Mistakes a person makes (a missing file, a wrong key,
genes that do not match, a directory that is not a model) end with one line on stderr and exit
status 1 (2 for a malformed command line), never a traceback; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import tomllib
import warnings
from pathlib import Path

__all__ = ["main", "build_parser", "CLIError"]

PROG = "dgdlens"
DEVICE_HELP = "'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'"
SPEC_HELP = (".npy, .npz[:KEY], .csv/.tsv (first column: cell names), .pt[:KEY], or FILE.h5ad:OBSM_KEY "
             "(e.g. out.h5ad:X_dgd; an 'h5ad:' prefix is allowed)")


class CLIError(Exception):
    """A mistake in what the user asked for; shown as one line, exit status 1."""


# ----------------------------------------------------------------------------------------------- parser

class _HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default after its help, unless the default says nothing (None / False)."""

    def __init__(self, prog, **kwargs):
        kwargs.setdefault("max_help_position", 32)
        super().__init__(prog, **kwargs)

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or not action.option_strings or action.default is None
                or action.default is False or action.default is argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("general")
    group.add_argument("--config", metavar="FILE.toml",
                       help="TOML file with any of this command's options (the command line wins)")
    group.add_argument("--threads", type=int, metavar="N",
                       help="CPU threads for torch (default: torch's choice; 1 is often fastest for small "
                            "models or on a busy machine)")
    group.add_argument("--debug", action="store_true",
                       help="on an error, show the full Python traceback instead of one line")
    return common


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show progress bars")


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _device_arg(text) -> str:
    """``--device``: checked when the command line is read, not after the data are loaded."""
    value = str(text).strip().lower()
    if not _DEVICE.match(value):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N.")
    return value


def _positive_int(text) -> int:
    """A whole number >= 1 (epochs, sizes, checkpoint intervals)."""
    if isinstance(text, float) and text.is_integer():
        text = int(text)
    try:
        value = int(text) if not isinstance(text, float) else None
    except (TypeError, ValueError):
        value = None
    if value is None:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r} (a positive integer is needed)")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _add_device(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument("--device", default=default, type=_device_arg, metavar="DEVICE",
                   help=f"where to compute: {DEVICE_HELP}")


def _add_overwrite(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true", help=f"replace {what} if it already exists")


def _train_parser(sub, common) -> None:
    p = sub.add_parser(
        "train", parents=[common], formatter_class=_HelpFormatter,
        help="fit a Deep Generative Decoder (DGD) to raw counts",
        description="Fit a Deep Generative Decoder to the raw counts of an .h5ad file and save the model "
                    "to a directory (weights.safetensors + config.json). Under torchrun, training is "
                    "spread over the processes (python -m dgdlens train ...).")
    p.add_argument("data", nargs="?", metavar="DATA.h5ad",
                   help="cells x genes with raw integer counts (in X, or in --layer)")
    p.add_argument("-o", "--out", metavar="MODEL_DIR",
                   help="directory to save the trained model to (required)")
    p.add_argument("--layer", metavar="LAYER",
                   help="layer holding the raw counts ('raw' for adata.raw.X; default: X)")
    p.add_argument("--labels-key", metavar="OBS_KEY",
                   help="obs column of cell labels; sets the number of mixture components when "
                        "--n-components is not given (never used in training)")
    p.add_argument("--batch-key", metavar="OBS_KEY",
                   help="obs column of the batch (or donor, sample): each cell gets a batch latent with a "
                        "supervised prior, so the biological latent is batch-corrected (multiDGD's covariates)")
    p.add_argument("--n-latent", type=_positive_int, metavar="N", default=20, help="latent dimensions")
    p.add_argument("--n-components", type=_positive_int, metavar="K",
                   help="mixture components (default: one per label category, else about log2(cells))")
    p.add_argument("--hidden", type=int, nargs="+", default=[100, 100, 100], metavar="WIDTH",
                   help="widths of the decoder's hidden layers")
    p.add_argument("--epochs", dest="max_epochs", type=_positive_int, default=500, metavar="N",
                   help="maximum number of epochs (max_epochs= in the API)")
    p.add_argument("--batch-size", type=_positive_int, default=256, metavar="N", help="cells per mini-batch")
    p.add_argument("--early-stopping", action=argparse.BooleanOptionalAction, default=True,
                   help="stop when the validation loss stops improving and keep the best epoch")
    p.add_argument("--patience", type=int, metavar="N",
                   help="epochs without improvement before stopping (default: 20)")
    p.add_argument("--validation-fraction", type=float, default=0.1, metavar="F",
                   help="share of cells held out to monitor training")
    _add_device(p)
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="random seed (split, initialisation, batch order)")
    p.add_argument("--backed", action="store_true",
                   help="read DATA.h5ad from disk batch by batch (backed='r') instead of loading it")
    p.add_argument("--checkpoint", dest="checkpoint_path", metavar="FILE",
                   help="write a resumable checkpoint to FILE during training (and on Ctrl-C) "
                        "(checkpoint_path= in the API)")
    p.add_argument("--checkpoint-every", type=_positive_int, metavar="N",
                   help="epochs between checkpoints (default: 50; needs --checkpoint)")
    p.add_argument("--resume", dest="resume_from", metavar="FILE",
                   help="continue training from a checkpoint written by --checkpoint "
                        "(resume_from= in the API)")
    p.add_argument("--latents", metavar="FILE",
                   help="also write the training cells' latents: .h5ad (DATA plus obsm X_dgd and obs "
                        "dgd_cluster), .npy or .csv")
    _add_overwrite(p, "MODEL_DIR (only a dgdlens model folder), --latents and --checkpoint")
    _add_progress(p)
    p.set_defaults(handler=_cmd_train, required=("data", "out"))


def _embed_parser(sub, common) -> None:
    p = sub.add_parser(
        "embed", parents=[common], formatter_class=_HelpFormatter,
        help="latent representation and mixture cluster of new cells",
        description="Embed new cells with a trained DGD (decoder and mixture frozen, one latent vector "
                    "fitted per cell; genes matched by name) and write them with obsm['X_dgd'] and "
                    "obs['dgd_cluster'].")
    p.add_argument("model", nargs="?", metavar="MODEL_DIR", help="directory written by 'dgdlens train'")
    p.add_argument("data", nargs="?", metavar="NEW.h5ad", help="cells x genes, raw integer counts")
    p.add_argument("-o", "--out", metavar="OUT",
                   help="output: .h5ad (the input plus latents and clusters), .npy or .csv (latents only) "
                        "(required)")
    p.add_argument("--layer", metavar="LAYER",
                   help="layer holding the raw counts (default: the one the model was trained on)")
    p.add_argument("--n-steps", type=_positive_int, default=200, metavar="N", help="optimisation steps per cell")
    p.add_argument("--batch-size", type=_positive_int, default=1024, metavar="N", help="cells embedded together")
    p.add_argument("--key-added", default="X_dgd", metavar="KEY", help="obsm key the latents are written to")
    p.add_argument("--cluster-key", default="dgd_cluster", metavar="KEY",
                   help="obs key for the mixture clusters")
    _add_device(p)
    p.add_argument("--backed", action="store_true",
                   help="read NEW.h5ad from disk batch by batch (backed='r')")
    _add_overwrite(p, "OUT")
    _add_progress(p)
    p.set_defaults(handler=_cmd_embed, required=("model", "data", "out"))


def _sae_parser(sub, common) -> None:
    p = sub.add_parser(
        "sae", parents=[common], formatter_class=_HelpFormatter,
        help="train a sparse autoencoder on cell embeddings",
        description="Train a sparse autoencoder (SAE) on a cells x dimensions embedding, e.g. the DGD "
                    "latents, and save it to a directory. Prints its quality (FVU, L0, dead features).")
    p.add_argument("embeddings", nargs="?", metavar="EMBEDDINGS", help=f"the embedding: {SPEC_HELP}")
    p.add_argument("-o", "--out", metavar="SAE_DIR", help="directory to save the SAE to (required)")
    p.add_argument("--kind", default="topk", choices=["topk", "batchtopk", "jumprelu", "relu"],
                   help="SAE variant")
    p.add_argument("--n-latents", type=int, metavar="N",
                   help="number of SAE features (default: 16 x input dimensions)")
    p.add_argument("--k", type=int, metavar="K",
                   help="active features per cell (topk, batchtopk); target L0 for jumprelu")
    p.add_argument("--epochs", dest="max_epochs", type=_positive_int, metavar="N",
                   help="maximum training epochs (max_epochs= in the API; default: the variant's)")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="cells per mini-batch (default: the variant's)")
    p.add_argument("--lr", type=float, metavar="LR", help="learning rate (default: the variant's)")
    p.add_argument("--l1-coef", type=float, metavar="C", help="sparsity penalty of the relu variant")
    p.add_argument("--preset", choices=["paper"], help="start from the reference paper's settings")
    p.add_argument("--validation-fraction", type=float, default=0.0, metavar="F",
                   help="share of cells held out for validation")
    p.add_argument("--patience", type=int, metavar="N",
                   help="stop after this many epochs without validation improvement")
    _add_device(p)
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed")
    p.add_argument("--activations", metavar="FILE",
                   help="also write the activations of all cells: .npz (sparse), .npy or .csv")
    _add_overwrite(p, "SAE_DIR (and --activations)")
    _add_progress(p)
    p.set_defaults(handler=_cmd_sae, required=("embeddings", "out"))


def _annotate_parser(sub, common) -> None:
    p = sub.add_parser(
        "annotate", parents=[common], formatter_class=_HelpFormatter,
        help="annotate SAE features with gene sets (GO, Hallmark, ...)",
        description="For every SAE feature, compare the cells where it is most active with cells where it "
                    "is silent, and test the changed genes for gene-set over-representation. Writes one "
                    "row per (feature, gene set, direction) that passes --max-padj.")
    p.add_argument("-a", "--activations", metavar="ACTIVATIONS",
                   help=f"cells x features: {SPEC_HELP} (required)")
    p.add_argument("-e", "--expression", metavar="DATA.h5ad",
                   help="the same cells' expression (raw counts or log-normalised) (required)")
    p.add_argument("-o", "--out", metavar="FEATURES.csv", help="annotation table to write (required)")
    p.add_argument("--layer", metavar="LAYER",
                   help="layer of DATA.h5ad to use ('raw' for adata.raw.X; default: X)")
    p.add_argument("--gene-symbols", metavar="VAR_KEY",
                   help="var column with gene symbols (default: var_names)")
    p.add_argument("--gene-sets", default="go_bp", metavar="NAME|FILE",
                   help="go_bp, go_mf, go_cc, hallmark, reactome_wp_pid, or a .gmt file")
    p.add_argument("--percentile", type=float, default=99.0, metavar="Q",
                   help="a feature's active group: its top max(--min-active-cells, (100 - Q) %% of cells) "
                        "active cells")
    p.add_argument("--min-active-cells", type=int, default=20, metavar="N",
                   help="smallest active group; features active in fewer cells are skipped")
    p.add_argument("--fdr", choices=["global", "per_feature"], default="global",
                   help="Benjamini-Hochberg across every (feature, term) test (global), or within each feature")
    p.add_argument("--count-split", action=argparse.BooleanOptionalAction, default=None,
                   help="test genes on a binomial half of the counts (default: on for integer counts)")
    p.add_argument("--background", choices=["all", "matched"], default="all",
                   help="gene-set universe: all tested genes, or genes matched on mean expression")
    p.add_argument("--test", default="t-test", choices=["t-test", "wilcoxon"],
                   help="differential expression test")
    p.add_argument("--min-set-size", type=int, default=10, metavar="N",
                   help="smallest gene set tested (genes measured)")
    p.add_argument("--max-set-size", type=int, default=500, metavar="N",
                   help="largest gene set tested (genes measured)")
    p.add_argument("--max-padj", type=float, default=0.05, metavar="P",
                   help="report rows with adjusted p-value up to this")
    p.add_argument("--compat", choices=["paper"], help="use the reference paper's statistics instead")
    p.add_argument("--features-summary", metavar="FILE.csv",
                   help="also write one row per feature (group sizes, genes changed, top term)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="random seed (subsampling of silent cells)")
    p.add_argument("--backed", action="store_true",
                   help="read DATA.h5ad from disk in chunks of cells (backed='r') instead of loading it: "
                        "memory bounded by --max-memory-gb plus one chunk, not by the number of cells")
    p.add_argument("--max-memory-gb", type=float, default=2.5, metavar="GB",
                   help="with --backed: memory for the group statistics (16 bytes x features x genes, 32 with "
                        "max_low_cells=None); more features than fit take one more pass over the file each")
    _add_overwrite(p, "the output files")
    _add_progress(p)
    p.set_defaults(handler=_cmd_annotate, required=("activations", "expression", "out"))


def _steer_parser(sub, common) -> None:
    p = sub.add_parser(
        "steer", parents=[common], formatter_class=_HelpFormatter,
        help="change one SAE feature and see which genes the DGD predicts to change",
        description="Set, add to, scale or switch off one SAE feature in every cell, move the cells' "
                    "latents along the feature's direction, decode them with the DGD, and compare the "
                    "predicted expression with the original: per-gene log2 fold changes with a paired "
                    "t statistic, and gene-set enrichment of the changed genes.")
    p.add_argument("model", nargs="?", metavar="MODEL_DIR", help="directory written by 'dgdlens train'")
    p.add_argument("sae", nargs="?", metavar="SAE_DIR", help="directory written by 'dgdlens sae'")
    p.add_argument("data", nargs="?", metavar="DATA.h5ad",
                   help="the cells to steer (latents from obsm[--use-rep], else embedded now)")
    p.add_argument("-o", "--out", metavar="OUT_DIR",
                   help="directory for genes.csv, enrichment.csv and summary.json (required)")
    p.add_argument("--feature", type=int, metavar="INDEX",
                   help="index of the SAE feature to steer (required)")
    p.add_argument("--mode", default="clamp", choices=["clamp", "add", "scale", "ablate"],
                   help="clamp: set to VALUE; add: add VALUE; scale: multiply by VALUE; ablate: set to 0")
    p.add_argument("--value", type=float, metavar="X",
                   help="the activation, amount or factor (not for ablate)")
    p.add_argument("--cells", metavar="OBS_KEY=VALUE",
                   help="steer only cells whose obs column has this value")
    p.add_argument("--use-rep", metavar="KEY",
                   help="obsm key with the cells' latents (default: X_dgd if present, else embed the cells)")
    p.add_argument("--layer", metavar="LAYER", help="layer with raw counts (for library sizes and embedding)")
    p.add_argument("--gene-sets", default="go_bp", metavar="NAME|FILE",
                   help="collection for the enrichment of changed genes, a .gmt file, or 'none'")
    p.add_argument("--n-controls", type=_positive_int, default=200, metavar="N",
                   help="random same-size edits each gene's change is compared with (empirical p-values)")
    p.add_argument("--random-control", action="store_true",
                   help="also steer along one more same-length random direction, scored like the feature")
    p.add_argument("--max-cells", type=_positive_int, default=10_000, metavar="N",
                   help="steer a seeded random subsample of at most N of the selected cells (the result "
                        "holds cells x genes values)")
    _add_device(p)
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (random control)")
    _add_overwrite(p, "files in OUT_DIR")
    p.set_defaults(handler=_cmd_steer, required=("model", "sae", "data", "out", "feature"))


def _demo_parser(sub, common) -> None:
    p = sub.add_parser(
        "demo", parents=[common], formatter_class=_HelpFormatter,
        help="run the whole pipeline on bundled PBMC data and write a report",
        description="On the bundled pbmc68k_reduced counts (700 cells, no download): train a DGD, embed "
                    "held-out cells, train an SAE on the latents, annotate its features with GO "
                    "biological processes, steer one feature, and write adata.h5ad, the models, "
                    "features.csv and report.html to --out. A few minutes on 2 CPU cores.")
    p.add_argument("-o", "--out", default="dgdlens-demo", metavar="DIR", help="output directory")
    p.add_argument("--quick", action="store_true",
                   help="a fast, rough run (few epochs) to check that everything works")
    p.add_argument("--multiome", action="store_true",
                   help="simulated paired RNA + ATAC instead (offline): a two-modality DGD with a batch covariate, "
                        "cross-modal prediction of held-out cells, the lens on genes and on peaks, steering read "
                        "out in both modalities; writes mdata.h5mu instead of adata.h5ad")
    p.add_argument("--epochs", dest="max_epochs", type=_positive_int, metavar="N",
                   help="maximum DGD epochs (max_epochs= of run_demo; default: 250 with early stopping; "
                        "15 with --quick; --multiome: 100, 25 with --quick, no early stopping)")
    _add_device(p)
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty folder the demo did not write (only the demo's own files "
                        "are replaced; nothing else is deleted)")
    _add_progress(p)
    p.set_defaults(handler=_cmd_demo, required=())


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dgdlens`` command (subcommands in ``parser.subcommands``)."""
    from ._version import __version__

    common = _common_options()
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=_HelpFormatter,
        description="Deep Generative Decoder models of single-cell counts and sparse-autoencoder lenses on "
                    "their latent spaces. Every option can also come from a TOML file (--config).",
        epilog="Run 'dgdlens COMMAND --help' for the options of a command. Start with 'dgdlens demo'.")
    parser.add_argument("--version", action="version", version=f"dgdlens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for add in (_demo_parser, _train_parser, _embed_parser, _sae_parser, _annotate_parser, _steer_parser):
        add(sub, common)
    parser.subcommands = dict(sub.choices)
    return parser


# ----------------------------------------------------------------------------------------------- config

_NOT_CONFIGURABLE = {"help", "config", "handler", "required", "command", "version"}


def _config_keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Config-file keys of a subcommand: each option's name with dashes or underscores."""
    keys = {}
    for action in parser._actions:
        if action.dest in _NOT_CONFIGURABLE:
            continue
        names = {action.dest, action.dest.replace("_", "-")}
        names |= {s.lstrip("-") for s in action.option_strings if s.startswith("--")}
        for name in names:
            keys[name] = action
    return keys


def _coerce(action: argparse.Action, value, where: str):
    """A TOML value checked and converted the way the command line would convert it."""
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise CLIError(f"{where} must be true or false, got {value!r}.")
        return value
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        return [_coerce_one(action, v, where) for v in items]
    if isinstance(value, (list, dict)):
        raise CLIError(f"{where} must be a single value, got {value!r}.")
    return _coerce_one(action, value, where)


def _coerce_one(action: argparse.Action, value, where: str):
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise CLIError(f"{where} = {value!r} is not a valid value.")
    convert = action.type or str
    integer = convert in (int, _positive_int)
    if integer and isinstance(value, float) and not value.is_integer():
        raise CLIError(f"{where} must be a whole number, got {value!r}.")
    try:
        out = convert(int(value) if integer and isinstance(value, float) else value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
        raise CLIError(f"{where} = {value!r} is not a valid value ({err}).") from None
    if action.choices is not None and out not in action.choices:
        raise CLIError(f"{where} = {value!r} is not one of {', '.join(map(str, action.choices))}.")
    return out


def read_config(path, command: str, subcommands: dict[str, argparse.ArgumentParser]) -> dict:
    """Option values for ``command`` from a TOML file: top-level keys, then the ``[command]`` table."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"config file {path} {'is not a file' if path.exists() else 'does not exist'}.")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise CLIError(f"config file {path} is not valid TOML: {err}.") from None
    keys = _config_keys(subcommands[command])
    every_key = set().union(*(_config_keys(p) for p in subcommands.values()))
    values = {}
    shared = {k: v for k, v in data.items() if not (k in subcommands and isinstance(v, dict))}
    for key, value in shared.items():
        if key not in every_key:
            raise CLIError(f"config file {path}: unknown option {key!r} (no command has it).")
        if key in keys:  # top-level keys apply only to the commands that have that option
            values[keys[key].dest] = _coerce(keys[key], value, f"{key!r} in {path}")
    table = data.get(command, {})
    for key, value in table.items() if isinstance(table, dict) else ():
        if key not in keys:
            valid = sorted({a.dest.replace("_", "-") for a in keys.values()})
            raise CLIError(f"config file {path}: [{command}] has unknown option {key!r}; "
                           f"valid: {', '.join(valid)}.")
        values[keys[key].dest] = _coerce(keys[key], value, f"{key!r} in [{command}] of {path}")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse the command line, fill in options from ``--config``, check required values."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        parser.exit(2, f"\n{PROG}: error: no command given; try 'dgdlens demo'.\n")
    sub = parser.subcommands[args.command]
    if args.config:
        try:
            sub.set_defaults(**read_config(args.config, args.command, parser.subcommands))
        except CLIError as err:
            sub.error(str(err))
        args = parser.parse_args(argv)  # command-line values override the file's
    missing = [name for name in args.required if getattr(args, name, None) is None]
    if missing:
        shown = {a.dest: (a.option_strings[-1] if a.option_strings else a.metavar) for a in sub._actions}
        listing = ", ".join(shown.get(m, m) for m in missing)
        sub.error(f"missing {listing}: give {'it' if len(missing) == 1 else 'them'} on the command line "
                  "or in the --config file.")
    return args


# ----------------------------------------------------------------------------------------------- files

def _is_main_process() -> bool:
    """False in every process but the first under torchrun: only that one prints and writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def _echo(text: str = "") -> None:
    """Messages for the user, from one process only when running under torchrun."""
    if _is_main_process():
        print(text, flush=True)


def _existing_file(path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise CLIError(f"{what} {path} does not exist.")
    if path.is_dir():
        raise CLIError(f"{what} {path} is a directory, not a file.")
    return path


def _model_dir(path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise CLIError(f"{what} {path} does not exist.")
    if not path.is_dir():
        raise CLIError(f"{what} {path} is a file; pass the directory the model was saved to.")
    return path


def _output_path(path, overwrite: bool, *, is_dir: bool = False, suffixes: tuple[str, ...] = (),
                 inputs=(), model_dir: bool = False, what: str = "output") -> Path:
    """Check an output location before any work is done (no surprise after an hour of training).

    Refused: an unsupported suffix; a file where a folder is needed (or the other way round); a path
    that is one of ``inputs``; a parent that is a file or not writable; an existing output without
    ``--overwrite``. A ``model_dir`` is replaced only if it is a dgdlens model folder with nothing else
    in it and none of ``inputs`` inside (see :func:`dgdlens._io.check_model_dir_replaceable`).
    """
    from ._io import OutputWriteError, check_model_dir_replaceable, check_output_location

    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise CLIError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; "
                       f"use one of {', '.join(suffixes)}.")
    try:
        check_output_location(path, what=what, inputs=inputs)
    except OutputWriteError as err:
        raise CLIError(str(err)) from None
    if path.exists():
        if is_dir and path.is_file():
            raise CLIError(f"{path} is a file; the output must be a directory.")
        if not is_dir and path.is_dir():
            raise CLIError(f"{path} is a directory; the output must be a file.")
        if not overwrite and (not is_dir or any(path.iterdir())):
            raise CLIError(f"{path} already exists; pass --overwrite to replace it, or choose another path.")
        if model_dir:
            try:
                check_model_dir_replaceable(path, inputs=inputs)
            except FileExistsError as err:
                raise CLIError(f"--overwrite refused: {err}") from None
    return path


def _distinct_outputs(outputs: dict[str, Path | None], model_dirs: dict[str, Path | None] | None = None) -> None:
    """Two outputs may not be the same path, and no other output may be written into a model folder
    (``model_dirs``: an output model folder or an input one; it would no longer be replaceable)."""
    given = {flag: Path(p).resolve() for flag, p in outputs.items() if p is not None}
    flags = list(given)
    for i, a in enumerate(flags):
        for b in flags[i + 1:]:
            if given[a] == given[b]:
                raise CLIError(f"{a} and {b} are the same path ({outputs[a]}); give each output its own path.")
    for d, folder in (model_dirs or {}).items():
        if folder is None:
            continue
        folder = Path(folder).resolve()
        for flag, p in given.items():
            if flag != d and (p == folder or folder in p.parents):
                raise CLIError(f"{flag} {outputs[flag]} is inside the model folder {d} {folder}; write it "
                               "next to the model folder instead.")


def read_h5ad(path, *, backed: bool = False):
    """An AnnData from ``path`` with a clear error for a missing or unreadable file."""
    import anndata

    path = _existing_file(path, "data file")
    try:
        return anndata.read_h5ad(path, backed="r" if backed else None)
    except Exception as err:  # h5py and anndata raise many types for a file that is not an .h5ad
        raise CLIError(f"could not read {path} as an .h5ad file ({type(err).__name__}: {err}).") from None


_SPEC = re.compile(r"^(?P<path>.+\.(?:h5ad|npz|pt|pth)):(?P<key>[^/\\:]+)$", re.IGNORECASE)


def split_spec(spec: str) -> tuple[str, str | None]:
    """``"out.h5ad:X_dgd"`` (or ``"h5ad:out.h5ad:X_dgd"``) -> ``("out.h5ad", "X_dgd")``; plain paths get
    key ``None``."""
    spec = str(spec)
    if spec.lower().startswith("h5ad:") and not Path(spec).exists():
        spec = spec[len("h5ad:"):]
    match = _SPEC.match(spec)
    if match and not Path(spec).exists():
        return match["path"], match["key"]
    return str(spec), None


def read_matrix(spec: str, what: str):
    """A cells x columns matrix from a file spec (see ``SPEC_HELP``): ``(matrix, cell_names_or_None)``.

    Sparse stays sparse (``.npz`` written by scipy, sparse ``obsm`` entries); an ``.h5ad`` is opened
    backed, so its count matrix is never loaded.
    """
    import numpy as np
    import scipy.sparse as sp

    from .sae.io import load_embedding

    path, key = split_spec(spec)
    path = _existing_file(path, f"{what} file")
    suffix = path.suffix.lower()
    if suffix == ".h5ad":
        if key is None:
            raise CLIError(f"{what}: say which obsm entry of {path} to use, e.g. {path}:X_dgd.")
        adata = read_h5ad(path, backed=True)
        try:
            if key not in adata.obsm:
                available = ", ".join(adata.obsm.keys()) or "none"
                raise CLIError(f"{path} has no obsm[{key!r}]; available: {available}.")
            value = adata.obsm[key]
            matrix = value if sp.issparse(value) else np.asarray(value)
            return _checked_matrix(matrix, path, what), adata.obs_names.copy()
        finally:
            adata.file.close()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            is_sparse = {"format", "indptr", "indices", "data", "shape"} <= set(archive.files)
        if is_sparse:
            return _checked_matrix(sp.load_npz(path).tocsr(), path, what), None
    try:
        matrix, cells = load_embedding(path, key=key)
    except (KeyError, OSError, RuntimeError, EOFError) as err:
        raise CLIError(f"could not read {what} from {path} ({type(err).__name__}: {err}).") from None
    return _checked_matrix(matrix, path, what), cells


def _checked_matrix(matrix, path, what: str):
    """A cells x dims matrix of numbers, or one line that says what is wrong with the file."""
    import numpy as np

    shape = getattr(matrix, "shape", ())
    if len(shape) != 2:
        hint = (" (one value per cell: save it as x.reshape(-1, 1))" if len(shape) == 1 else "")
        raise CLIError(f"{what} in {path} has shape {tuple(shape)}; expected a 2-D matrix of cells x dims{hint}.")
    dtype = getattr(matrix, "dtype", None)
    if dtype is not None and not (np.issubdtype(dtype, np.number) or dtype == bool):
        raise CLIError(f"{what} in {path} has dtype {dtype}, not numbers; convert it to a numeric dtype "
                       "(e.g. x.astype(np.float32)) and save it again.")
    return matrix


def write_matrix(path: Path, matrix, cells=None) -> None:
    """``.npz`` (sparse), ``.npy`` or ``.csv`` (cell names in the first column), written whole or not at
    all (a temporary file renamed into place, see :func:`dgdlens._io.atomic_path`)."""
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from ._io import atomic_path

    path = Path(path)
    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix == ".npz":
            sp.save_npz(tmp, sp.csr_matrix(matrix))
            return
        dense = matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)
        if suffix == ".npy":
            np.save(tmp, dense)
        else:
            pd.DataFrame(dense, index=None if cells is None else pd.Index(cells, name="cell")).to_csv(tmp)


def _gene_sets_arg(value: str):
    if value is None or value.lower() == "none":
        return None
    if value.lower().endswith(".gmt") or value.lower().endswith(".gmt.gz"):
        return str(_existing_file(value, "gene set file"))
    return value


# ----------------------------------------------------------------------------------------------- commands

def _cmd_train(args) -> None:
    from . import _dist as distributed
    from .models import DGD

    # under torchrun: join the process group first, so that "cuda" means this process's GPU
    distributed.init(device=args.device)
    _check_train_outputs(args)
    out = Path(args.out)
    if args.resume_from:  # under torchrun every process resumes from its own shard of the checkpoint
        own = distributed.shard_file(args.resume_from)
        _existing_file(own, "checkpoint")
    adata = read_h5ad(args.data, backed=args.backed)
    backed = " (backed)" if args.backed else ""
    _echo(f"Read {args.data}: {adata.n_obs:,} cells x {adata.n_vars:,} genes{backed}.")
    model = DGD(adata, layer=args.layer, n_latent=args.n_latent, n_components=args.n_components,
                labels_key=args.labels_key, hidden=args.hidden, validation_fraction=args.validation_fraction,
                seed=args.seed, batch_key=args.batch_key)
    _echo(f"Training {model}.")
    extra = {} if args.patience is None else {"patience": args.patience}
    if args.checkpoint_every is not None:
        extra["checkpoint_every"] = args.checkpoint_every
    model.train(max_epochs=args.max_epochs, batch_size=args.batch_size, early_stopping=args.early_stopping,
                device=args.device, checkpoint_path=args.checkpoint_path, resume_from=args.resume_from,
                progress=args.progress, **extra)
    model.save(out, overwrite=args.overwrite)
    if args.latents:
        distributed.run_on_main(_write_latents, Path(args.latents), model, adata)
    s, history = model.train_summary_, model.history_
    last = history.iloc[-1]
    losses = ", ".join(f"{k.replace('_', ' ')} {last[k]:.4g}"
                       for k in ("train_recon", "val_recon") if k in last)
    _echo(f"Done: {s['epochs_run']} epochs in {s['fit_time_s']:.0f} s (best epoch {s['best_epoch']}"
          f"{', stopped early' if s['stopped_early'] else ''}); last epoch: {losses} (nats per cell).")
    _echo(f"Saved the model to {out}/" + (f"; latents to {args.latents}." if args.latents else "."))


def _check_train_outputs(args) -> None:
    """Every output of ``train`` (--out, --latents, --checkpoint) is checked before the data are read,
    so a run is never lost to a path that cannot be written."""
    if args.checkpoint_every is not None and not args.checkpoint_path:
        raise CLIError("--checkpoint-every needs --checkpoint FILE (where to write the checkpoints).")
    inputs = [p for p in (args.data, args.resume_from) if p]
    _output_path(args.out, args.overwrite, is_dir=True, inputs=inputs, model_dir=True, what="--out")
    if args.latents:
        _output_path(args.latents, args.overwrite, suffixes=(".h5ad", ".npy", ".csv"), inputs=inputs,
                     what="--latents")
    if args.checkpoint_path:
        same_as_resume = (args.resume_from
                          and Path(args.checkpoint_path).resolve() == Path(args.resume_from).resolve())
        _output_path(args.checkpoint_path, args.overwrite or bool(same_as_resume), inputs=[args.data],
                     what="--checkpoint")
    _distinct_outputs({"--out": Path(args.out), "--latents": args.latents,
                       "--checkpoint": args.checkpoint_path},
                      model_dirs={"--out": Path(args.out)})


def _resume_command(args, argv: list[str]) -> str:
    """The command line that continues an interrupted ``train`` from its checkpoint."""
    import shlex

    kept, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = True
            continue
        if a.startswith("--resume="):
            continue
        kept.append(a)
    return shlex.join([PROG, *kept, "--resume", str(args.checkpoint_path)])


def _write_latents(path: Path, model, adata) -> None:
    if path.suffix.lower() == ".h5ad":
        from .data.matrix import write_h5ad_out_of_core

        model.add_to_adata(adata)
        write_h5ad_out_of_core(adata, path)  # a backed X is copied on disk, not loaded
    else:
        write_matrix(path, model.get_latent_representation(), adata.obs_names)


def _cmd_embed(args) -> None:
    from . import _dist as distributed
    from .data.matrix import write_h5ad_out_of_core
    from .models import DGD

    # under torchrun: join the process group first, so that "cuda" means this process's GPU
    distributed.init(device=args.device)
    out = _output_path(args.out, args.overwrite, suffixes=(".h5ad", ".npy", ".csv"), inputs=[args.data],
                       what="--out")
    _distinct_outputs({"--out": out}, model_dirs={"MODEL_DIR": args.model})
    model = DGD.load(_model_dir(args.model, "model directory"), device=args.device)
    adata = read_h5ad(args.data, backed=args.backed)
    _echo(f"Embedding {adata.n_obs:,} cells of {args.data} with {model}.")
    model.add_to_adata(adata, key_added=args.key_added, cluster_key=args.cluster_key, layer=args.layer,
                       n_steps=args.n_steps, batch_size=args.batch_size, progress=args.progress)
    if out.suffix.lower() == ".h5ad":  # one process writes (under torchrun all hold the gathered latents)
        distributed.run_on_main(write_h5ad_out_of_core, adata, out)
    else:
        distributed.run_on_main(write_matrix, out, adata.obsm[args.key_added], adata.obs_names)
    sizes = adata.obs[args.cluster_key].value_counts()
    _echo(f"Wrote {out}: obsm[{args.key_added!r}] ({adata.n_obs:,} x {model.n_latent}) and "
          f"obs[{args.cluster_key!r}] ({int((sizes > 0).sum())} of {model.n_components} components used).")


def _cmd_sae(args) -> None:
    from .sae import metrics, train_sae

    embeddings = split_spec(args.embeddings)[0]
    out = _output_path(args.out, args.overwrite, is_dir=True, inputs=[embeddings], model_dir=True, what="--out")
    if args.activations:
        _output_path(args.activations, args.overwrite, suffixes=(".npz", ".npy", ".csv"), inputs=[embeddings],
                     what="--activations")
    _distinct_outputs({"--out": out, "--activations": args.activations}, model_dirs={"--out": out})
    X, cells = read_matrix(args.embeddings, "embeddings")
    _echo(f"Read {args.embeddings}: {X.shape[0]:,} cells x {X.shape[1]:,} dimensions.")
    options = {k: getattr(args, k) for k in ("n_latents", "k", "max_epochs", "batch_size", "lr", "l1_coef",
                                             "preset", "patience") if getattr(args, k) is not None}
    if args.patience is not None:  # patience means early stopping (on the validation cells, if any)
        options["early_stopping"] = True
    sae = train_sae(X, kind=args.kind, device=args.device, seed=args.seed,
                    validation_fraction=args.validation_fraction, progress=args.progress, **options)
    sae.save(out, overwrite=args.overwrite)
    quality = metrics(sae, X)
    _echo(f"Saved a {args.kind} SAE with {sae.n_latents:,} features to {out}/.")
    _echo(f"Quality on all {quality['n_cells']:,} cells: FVU {quality['fvu']:.3g} (fraction of variance not "
          f"reconstructed), L0 {quality['l0']:.3g} active features per cell, "
          f"{quality['dead_fraction']:.1%} dead features, cosine {quality['cosine']:.3f}.")
    if args.activations:
        write_matrix(Path(args.activations), sae.encode(X), cells)
        _echo(f"Wrote the activations to {args.activations}.")


def _aligned_activations(A, cells, adata, spec: str):
    """Activation rows in the expression's cell order (by name when the activations have names)."""
    import pandas as pd

    if cells is None:
        if A.shape[0] != adata.n_obs:
            raise CLIError(f"{spec} has {A.shape[0]:,} rows but the expression has {adata.n_obs:,} cells; "
                           "they must be the same cells in the same order.")
        return A
    cells = pd.Index(cells)
    for names, where in ((cells, spec), (pd.Index(adata.obs_names), "the expression's obs_names")):
        if names.has_duplicates:
            dup = ", ".join(map(str, names[names.duplicated()].unique()[:3]))
            raise CLIError(f"{where} has duplicated cell names (e.g. {dup}), so activations cannot be matched to "
                           "cells by name; call adata.obs_names_make_unique() before computing and saving them.")
    indexer = cells.get_indexer(adata.obs_names)
    if (indexer < 0).any():
        missing = adata.obs_names[indexer < 0]
        raise CLIError(f"{len(missing):,} of the expression's {adata.n_obs:,} cells have no activations in "
                       f"{spec} (e.g. {', '.join(missing[:3])}); use activations computed for these cells.")
    return A[indexer]


def _cmd_annotate(args) -> None:
    from . import tl

    inputs = [split_spec(args.activations)[0], args.expression]
    out = _output_path(args.out, args.overwrite, suffixes=(".csv", ".tsv"), inputs=inputs, what="--out")
    if args.features_summary:
        _output_path(args.features_summary, args.overwrite, suffixes=(".csv", ".tsv"), inputs=inputs,
                     what="--features-summary")
    _distinct_outputs({"--out": out, "--features-summary": args.features_summary})
    A, cells = read_matrix(args.activations, "activations")
    adata = read_h5ad(args.expression, backed=args.backed)
    adata.obsm["activations"] = _aligned_activations(A, cells, adata, args.activations)
    n_genes = adata.raw.n_vars if args.layer == "raw" and adata.raw is not None else adata.n_vars
    _echo(f"Annotating {A.shape[1]:,} features over {adata.n_obs:,} cells x {n_genes:,} genes "
          f"with {args.gene_sets}.")
    tl.annotate_features(
        adata, use_rep="activations", gene_sets=_gene_sets_arg(args.gene_sets), layer=args.layer,
        gene_symbols=args.gene_symbols, key_added="annotation", compat=args.compat,
        percentile=args.percentile, min_active_cells=args.min_active_cells, test=args.test,
        min_set_size=args.min_set_size, max_set_size=args.max_set_size, max_padj=args.max_padj,
        fdr=args.fdr, count_split="auto" if args.count_split is None else args.count_split,
        background=args.background, seed=args.seed, progress=args.progress, max_memory=args.max_memory_gb * 1e9)
    results, features = adata.uns["annotation"]["results"], adata.uns["annotation"]["features"]
    _write_table(results, out)
    if args.features_summary:
        _write_table(features, Path(args.features_summary))
    n_tested = int((features["status"] == "ok").sum()) if "status" in features else len(features)
    _echo(f"Wrote {len(results):,} rows to {out}: {results['feature'].nunique():,} of {n_tested:,} tested "
          f"features have a gene set with {'global ' if args.fdr == 'global' else 'per-feature '}"
          f"adjusted p <= {args.max_padj:g}.")
    for line in _top_terms(results, 5):
        _echo("  " + line)


def _top_terms(results, n: int) -> list[str]:
    if len(results) == 0:
        return []
    key = "padj_global" if "padj_global" in results else "padj"
    best = results.sort_values(key, kind="stable").drop_duplicates("feature").head(n)
    return [f"feature {r.feature}: {r.term} ({r.direction}, {key} {getattr(r, key):.2g})" for r in best.itertuples()]


def _write_table(df, path: Path) -> None:
    from ._io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t" if path.suffix.lower() == ".tsv" else ",", index=False)


def _cell_mask(adata, spec: str | None):
    if spec is None:
        return None
    key, sep, value = spec.partition("=")
    if not sep:
        raise CLIError(f"--cells must look like OBS_KEY=VALUE (e.g. cell_type=B cell), got {spec!r}.")
    if key not in adata.obs.columns:
        raise CLIError(f"--cells: obs has no column {key!r} (columns: {', '.join(adata.obs.columns)}).")
    mask = (adata.obs[key].astype(str) == value).to_numpy()
    if not mask.any():
        shown = ", ".join(map(str, adata.obs[key].astype(str).unique()[:10]))
        raise CLIError(f"--cells: no cell has {key} == {value!r} (values include: {shown}).")
    return mask


def _cmd_steer(args) -> None:
    from ._io import atomic_write_text
    from .models import DGD
    from .sae import SAE
    from .steer import steer, steering_summary

    inputs = [args.model, args.sae, args.data]
    out = _output_path(args.out, args.overwrite, is_dir=True, inputs=inputs, what="--out")
    for name in ("genes.csv", "enrichment.csv", "control_genes.csv", "summary.json"):
        _output_path(Path(args.out) / name, True, inputs=inputs, what="--out")
    _distinct_outputs({"--out": Path(args.out) / "genes.csv"}, model_dirs={"MODEL_DIR": args.model,
                                                                           "SAE_DIR": args.sae})
    model = DGD.load(_model_dir(args.model, "model directory"), device=args.device)
    sae = SAE.load(_model_dir(args.sae, "SAE directory"), device=model.device)
    adata = read_h5ad(args.data)
    use_rep = args.use_rep or ("X_dgd" if "X_dgd" in adata.obsm else None)
    cells = _cell_mask(adata, args.cells)
    edit = args.mode if args.value is None else f"{args.mode} {args.value:g}"
    _echo(f"Steering feature {args.feature} ({edit}) in "
          f"{adata.n_obs if cells is None else int(cells.sum()):,} cells"
          f"{f' (latents from obsm[{use_rep!r}])' if use_rep else ' (embedding them first)'}.")
    result = steer(model, sae, adata, feature=args.feature, mode=args.mode, value=args.value, cells=cells,
                   use_rep=use_rep, layer=args.layer, gene_sets=_gene_sets_arg(args.gene_sets),
                   random_control=args.random_control, n_controls=args.n_controls, seed=args.seed,
                   max_cells=args.max_cells)
    out.mkdir(parents=True, exist_ok=True)
    _write_table(result.genes, out / "genes.csv")
    _write_table(result.enrichment, out / "enrichment.csv")
    if result.control is not None:
        _write_table(result.control.genes, out / "control_genes.csv")
    summary = steering_summary(result)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    _echo(f"{summary['genes_up']} genes up, {summary['genes_down']} down (empirical p against "
          f"{result.n_controls.get('random', 0)} same-size random edits, BH < 0.05, |log2FC| >= 0.25); "
          f"cells moved {summary['mean_shift']:.3g} in latent space on average. Wrote {out}/.")
    if result.gene_set_tests is not None:
        _write_table(result.gene_set_tests, out / "gene_set_tests.csv")
    for line in _steered_genes(result.genes, 5):
        _echo("  " + line)


def _steered_genes(genes, n: int) -> list[str]:
    order = genes.reindex(genes["log2fc"].abs().sort_values(ascending=False).index).head(n)
    return [f"{r.gene}: log2FC {r.log2fc:+.2f} (empirical padj {r.padj:.2g})" for r in order.itertuples()]


def _cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, max_epochs=args.max_epochs, device=args.device, seed=args.seed,
             progress=args.progress, num_threads=args.threads or 1, echo=_echo, overwrite=args.overwrite,
             multiome=args.multiome)


# ----------------------------------------------------------------------------------------------- entry point

def _set_threads(n: int) -> None:
    import torch

    if n < 1:
        raise CLIError(f"--threads must be a positive integer, got {n}.")
    torch.set_num_threads(n)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error_text(err: BaseException) -> str:
    if isinstance(err, KeyError) and err.args:
        return _one_line(err.args[0])
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)) and err.filename:
        return _one_line(f"{err.strerror or err}: {err.filename}")
    return _one_line(str(err)) or type(err).__name__


def _quiet_warnings() -> None:
    """Library deprecation chatter is not for the user; our own warnings are shown on one line."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{PROG}: warning: {_one_line(message)}", file=sys.stderr, flush=True)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    """Run the ``dgdlens`` command; returns the exit status (0: success, 1: error, 2: bad command line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)  # argparse itself prints usage + one error line and exits with status 2
    _quiet_warnings()
    start = time.perf_counter()
    try:
        if args.threads is not None:
            _set_threads(args.threads)
        args.handler(args)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted.", file=sys.stderr)
        if args.command == "train" and args.checkpoint_path and Path(args.checkpoint_path).exists():
            print(f"{PROG} train: the last checkpoint is {args.checkpoint_path}; continue with:\n  "
                  f"{_resume_command(args, argv)}", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the whole point: one line instead of a traceback
        if args.debug:
            raise
        expected = isinstance(err, (CLIError, ValueError, TypeError, KeyError, OSError))
        hint = "" if expected else " (an unexpected error; rerun with --debug and report the traceback)"
        print(f"{PROG} {args.command}: error: {_error_text(err)}{hint}", file=sys.stderr, flush=True)
        return 1
    if args.command != "demo":
        _echo(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
