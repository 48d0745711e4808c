"""MoE transformer: router, dispatcher, experts, MoE layer, model."""
