"""SD3 Workbench: SD3-style MMDiT text-to-image models with rectified flow and steerable MoE routing."""
