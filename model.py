"""
G3DR model: the triplane field (multi-resolution sampler + decoder f_dec), the f_trigen UNet that
lifts one RGB-D image to a triplane, and the G3DR module that ties them to the renderer.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

# === triplane field (f_dec + multi-resolution sampler) ===
# === end triplane field ===

# === f_trigen UNet and the G3DR module ===
# === end f_trigen UNet and the G3DR module ===
