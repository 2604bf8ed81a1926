from lorakit.cli import main

main(prog_name="lorakit")
