"""What a job is given and how it is read: the domain spec and its config, the prompt sets (the
spec's, the general benign set, the standard harm set) and how they are split, model and dataset
references, the preflight checks and the model loading."""
