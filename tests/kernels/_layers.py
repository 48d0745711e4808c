"""Two MoE layers with equal weights, one per kernel backend, for the kernel tests."""

import torch

from moemesh.kernels import TORCH_OPS, TRITON_OPS


def moe_layer_pair(device, **cfg_overrides):
    """(torch-ops layer, triton-ops layer) on ``device``, weights equal, std 0.3."""
    from moemesh.moe.config import ModelConfig
    from moemesh.moe.layer import MoELayer
    from moemesh.trainer.parallelize import apply_kernels

    cfg = ModelConfig(
        **{**dict(name="t", hidden_size=24, num_experts=8, top_k=2, moe_ffn_hidden_size=20), **cfg_overrides}
    )
    layers = [MoELayer(cfg=cfg), MoELayer(cfg=cfg)]
    for layer, ops in zip(layers, (TORCH_OPS, TRITON_OPS)):
        apply_kernels(layer, ops)
    torch.manual_seed(0)
    for p in layers[0].parameters():
        torch.nn.init.normal_(p, std=0.3)
    layers[1].load_state_dict(layers[0].state_dict())
    return [layer.to(device) for layer in layers]
