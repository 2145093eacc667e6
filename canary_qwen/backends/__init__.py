"""Inference backends behind one ``Transcriber`` interface, made by name through ``registry``."""
