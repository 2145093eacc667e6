"""Transcribe a corpus on a Ray cluster: the input list, the committed results, and the job that joins them.

``inputs`` turns a directory, glob or manifest into audio paths; ``results`` commits rows batch by batch and
merges them into one row per file (what makes a run resumable and a killed worker harmless); ``job`` runs
backend-holding Ray Data actors over the files still to do.
"""
