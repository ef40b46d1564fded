from depois_stream.cli import app

app(prog_name="depois-stream")
