from labscale.cli import main

main()
