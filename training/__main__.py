from training.cli import app

app(prog_name="depois-train")
