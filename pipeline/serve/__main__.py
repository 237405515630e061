"""``python -m pipeline.serve ...`` == ``defect serve ...``, without loading the other command modules."""

from pipeline.serve.cli import serve

if __name__ == "__main__":
    serve(prog_name="python -m pipeline.serve")
