"""gatewayctl: the operator's tool.

    gatewayctl migrate                       apply schema.sql (safe to repeat)
    gatewayctl dlq list                      dead-lettered operations, queue left as it was
    gatewayctl dlq show OPERATION_ID|HANDLE  operation, receipt, history, dead letters; or one letter
    gatewayctl dlq replay OPERATION_ID       put one back in the normal flow
    gatewayctl dlq replay --all [--force]    ... every one
    gatewayctl dlq drop HANDLE...|--unreadable   remove letters from the queue
    gatewayctl settle OPERATION_ID --outcome succeeded|failed --reason TEXT --by NAME [--bank-id ID]
    gatewayctl resolve PAYMENT_ID --reason TEXT --by NAME [--set FIELD=ID]...
    gatewayctl payments set-reference PAYMENT_ID --capture-id ID|--authorization-id ID|... --reason TEXT --by NAME
    gatewayctl abandon PAYMENT_ID --reason TEXT --by NAME
    gatewayctl reconcile [--repair] [--rate N] [--limit N]
    gatewayctl rekey-cards [--batch N]       seal every vaulted card under the newest card key
    gatewayctl ops-key NAME                  a new /ops key
    gatewayctl broker-account --merchant NAME   a merchant's own RabbitMQ account
    gatewayctl webhooks set|rotate-secret|list|disable|failed|resend

Every command takes --json (machine output on stdout). Exit codes: 0 done /
nothing to report, 1 something needs a human (findings, a refused or failed
replay, an unknown id, a decision that does not fit the payment), 2 bad
usage or configuration, 3 PostgreSQL or RabbitMQ cannot be reached (an
unreachable bank makes reconcile report `unverified` findings). Log lines
(LOG_LEVEL; only errors unless it is set) go to stderr, never into the output.

A front-end over gateway/ops/: each command group is a
module of its own that registers its commands (add_commands) and parses, prints and
picks the exit code; what they share is kit.py; main.py assembles the parser.

    migrate.py       migrate
    deadletters.py   dlq list|replay|drop (deadletter_show.py: dlq show)
    decisions.py     settle, resolve, payments set-reference, abandon
    reconcile.py     reconcile
    cardkeys.py      rekey-cards, ops-key
    brokeraccount.py broker-account
    webhooks.py      webhooks ...
"""
