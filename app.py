"""SCAL-SDT web app: `python app.py [--listen] [--port N] [--share --auth USER:PASS] [--inbrowser]`."""
import sys

from scal_gui.server import main

if __name__ == "__main__":
    sys.exit(main())
