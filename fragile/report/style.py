"""How every figure of the suite looks and is written: headless matplotlib, one style, one order of attacks,
atomic writes in every requested format."""
import os

import matplotlib

matplotlib.use("Agg")   # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from ..core.cli import UserError  # noqa: E402
from ..core.io import atomic_write  # noqa: E402

STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 7.5, "axes.grid": True,
         "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False, "savefig.bbox": "tight",
         "figure.constrained_layout.use": True}
PANEL_SIZE = (4.6, 3.4)     # inches per subplot
BAND_ALPHA = 0.2
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
# The suite's attacks in the order tables and legends list them: the fine-tuning trajectories first.
ATTACK_ORDER = ("finetune", "poison", "fine-prune", "restore", "obfuscate", "noise", "single-weight", "bitflip",
                "prune", "quantize")
ATTACK_COLORS = {"finetune": "tab:blue", "poison": "tab:red", "fine-prune": "tab:green", "restore": "tab:purple"}
SPARE_COLORS = ("tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
ATTACK_MARKERS = {"finetune": "o", "poison": "s", "fine-prune": "^", "restore": "D"}
ATTACK_NAMES = {"finetune": "clean fine-tuning", "poison": "poisoned fine-tuning (BadNets)",
                "fine-prune": "fine-pruning", "restore": "restore"}
METRIC_NAMES = {"match_rate": "trigger match rate", "clean_accuracy": "clean test accuracy",
                "attack_success_rate": "attack success rate", "backdoor_accuracy": "robust watermark accuracy"}


def attack_rank(attack):
    """Sort key: the suite's order, then any other attack by name."""
    return (ATTACK_ORDER.index(attack), "") if attack in ATTACK_ORDER else (len(ATTACK_ORDER), attack)


def apply_style():
    plt.rcParams.update(STYLE)


def supported_formats():
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    return formats


def save_figure(fig, out_dir, name, formats, dpi):
    """``fig`` as ``out_dir/name.<format>`` for every format, each written atomically and printed; the figure is
    closed. Returns the paths."""
    paths = []
    for ext in formats:
        path = os.path.join(out_dir, f"{name}.{ext}")
        try:
            atomic_write(path, lambda f, ext=ext: fig.savefig(f, format=ext, dpi=dpi))
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror}") from None
        print(f"figure -> {path}")
        paths.append(path)
    plt.close(fig)
    return paths
