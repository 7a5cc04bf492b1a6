"""Plain functions and Trainer plumbing shared by the stages."""
