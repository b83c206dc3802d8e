from ivp.cli import main

main()
