"""Models, training and inference for T1 <-> T2 MRI synthesis."""
