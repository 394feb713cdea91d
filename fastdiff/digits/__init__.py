"""The bundled digits toy: its data and prompts, the teacher trainer, the evaluation classifier."""
