from trainrig.cli import main

main()
