"""Class taxonomies shared by readers, text encoders and networks (no imports of our own)."""

from __future__ import annotations

__all__ = ["CLASS_NAMES", "NUM_CLASSES", "PROMPT_NAMES"]

# CLIP-Driven Universal Model: 32 classes.
NUM_CLASSES = 32

# Universal class names (index = position + 1; output channel = position).
CLASS_NAMES = (
    "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "postcava", "portal vein and splenic vein", "pancreas", "right adrenal gland", "left adrenal gland",
    "duodenum", "hepatic vessel", "right lung", "left lung", "colon", "intestine", "rectum", "bladder",
    "prostate", "left head of femur", "right head of femur", "celiac trunk", "kidney tumor", "liver tumor",
    "pancreas tumor", "hepatic vessel tumor", "lung tumor", "colon tumor", "kidney cyst",
)  # fmt: skip

# The official CLIP prompt names, typos ("Arota", "Celiac Truck") included: the released embedding uses them.
PROMPT_NAMES = (
    "Spleen", "Right Kidney", "Left Kidney", "Gall Bladder", "Esophagus", "Liver", "Stomach", "Arota",
    "Postcava", "Portal Vein and Splenic Vein", "Pancreas", "Right Adrenal Gland", "Left Adrenal Gland",
    "Duodenum", "Hepatic Vessel", "Right Lung", "Left Lung", "Colon", "Intestine", "Rectum", "Bladder",
    "Prostate", "Left Head of Femur", "Right Head of Femur", "Celiac Truck", "Kidney Tumor", "Liver Tumor",
    "Pancreas Tumor", "Hepatic Vessel Tumor", "Lung Tumor", "Colon Tumor", "Kidney Cyst",
)  # fmt: skip
