from runmap.server.runner import main

main()
