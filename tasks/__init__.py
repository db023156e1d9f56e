"""Thin Prefect tasks: each calls one finpipe library function and adds what orchestration owns.

Retries apply to transient faults only (I/O, a tracking server that blinked); a finpipe error
(a rejected batch, a bad parameter, a model that failed its gate) fails at once.
"""
