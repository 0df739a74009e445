"""The routing zoo: routing primitives, shared layers, models, data and the training engine."""
