from geomprobe.cli import main

main()
