"""Data pipeline: SynthTalk corpus, clip records (ArrayRecord), grain loaders."""
