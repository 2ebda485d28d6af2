"""ShapesWorld: the procedural dataset, trainer and evaluation of the embedded model."""
