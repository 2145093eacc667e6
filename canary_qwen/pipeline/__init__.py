"""From files to transcripts on any backend: audio loading and resampling, long-audio windows, batching."""
