from vesuvius_lab.cli import run

run()
