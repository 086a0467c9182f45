import gc

gc.disable()  # while the servlet's stack imports: runmap.server.runner.stack_imported turns it on again

from runmap.server.runner import main  # noqa: E402

main()
