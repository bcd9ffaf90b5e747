"""SCAL-SDT web interface: a thin Gradio client of the engine."""
