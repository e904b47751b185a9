"""The bundle's ``kamal`` program (packaging/kamal-studio.spec): the command line; also a rank > 0 of
``kamal run --nproc N``, which the bundle starts as ``kamal -m kamal_engine.rank_worker PARENT_PID``
(there is no Python to run ``-m`` with)."""
import multiprocessing
import sys

if __name__ == "__main__":
    multiprocessing.freeze_support()
    if sys.argv[1:3] == ["-m", "kamal_engine.rank_worker"]:
        from kamal_engine.rank_worker import worker_main

        sys.exit(worker_main(int(sys.argv[3])))
    from kamal_engine.cli import main

    sys.exit(main())
