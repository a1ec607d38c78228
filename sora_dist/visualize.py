"""Pictures a person would rather see than read: sampled frames and the loss curve."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def latent_to_rgb(frame: np.ndarray) -> np.ndarray:
    """(C, h, w) latent frame -> (h, w, 3) in [0, 1], showing channels 0-2 as RGB.

    Real latents need the VAE decoder to become pixels; this view is for inspecting latents
    whose first channels carry colour, like the synthetic blobs.
    """
    return np.clip((np.transpose(frame[:3], (1, 2, 0)) + 1) / 2, 0, 1)


def save_frame_grid(clips: Sequence[np.ndarray], labels: Sequence[str], path: str | Path) -> None:
    """One row per clip (C, T, h, w), one column per frame, labelled on the left."""
    frames = max(c.shape[1] for c in clips)
    fig, axes = plt.subplots(len(clips), frames, figsize=(1.4 * frames + 0.6, 1.6 * len(clips) + 0.4), squeeze=False)
    for row, (clip, label) in enumerate(zip(clips, labels)):
        for col in range(frames):
            ax = axes[row][col]
            ax.set_xticks([]), ax.set_yticks([])
            if col < clip.shape[1]:
                ax.imshow(latent_to_rgb(clip[:, col]), interpolation="nearest")
            if row == 0:
                ax.set_title(f"frame {col}", fontsize=8)
        axes[row][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_loss_plot(steps: Sequence[int], losses: Sequence[float], path: str | Path, title: str = "training loss") -> None:
    """Loss per logged step and its running mean over ten records."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, alpha=0.4, label="loss")
    if len(losses) >= 10:
        smooth = np.convolve(losses, np.ones(10) / 10, mode="valid")
        ax.plot(steps[9:], smooth, label="running mean (10)")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_title(title)
    ax.grid(alpha=0.3), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_loss_comparison(curves: dict[str, tuple[Sequence[int], Sequence[float]]], path: str | Path) -> None:
    """Loss curves of several runs on one plot (e.g. one layout against the single-process run)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for (label, (steps, losses)), style in zip(curves.items(), ["-", "--", ":", "-."] * 4):
        ax.plot(steps, losses, style, label=label, linewidth=1.6)
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both"), ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_track_plot(panels: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], path: str | Path) -> None:
    """One panel per application: position along the captioned direction per frame, of the true
    clips (dashed) and the generated ones, each (N, T) and relative to its true first frame;
    given frames are shaded."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0), squeeze=False, sharey=True)
    for ax, (name, (truth, generated, given)) in zip(axes[0], panels.items()):
        frames = np.arange(truth.shape[1])
        for f in np.flatnonzero(given):
            ax.axvspan(f - 0.5, f + 0.5, color="0.9")
        for row in generated:
            ax.plot(frames, row, color="tab:blue", alpha=0.35, linewidth=1)
        ax.plot(frames, np.nanmedian(truth, axis=0), "k--", linewidth=1.5, label="true")
        ax.plot(frames, np.nanmedian(generated, axis=0), color="tab:blue", linewidth=2, label="generated (median)")
        ax.set_title(name.replace("_", " "), fontsize=9)
        ax.set_xlabel("frame")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("along the caption's direction (px)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
