#!/bin/bash
# Run one node's torchrun (or one rank) for the sbatch scripts here and turn the job's "save and
# stop" request into SIGUSR1 for the training ranks only.
#
#   signal_ranks.sh children CMD...   CMD is torchrun: SIGUSR1 goes to its children, the ranks
#   signal_ranks.sh self CMD...       CMD is a rank (one task per GPU): SIGUSR1 goes to CMD
#
# The batch shell asks for the stop with `scancel --signal=URG <job>`: Slurm delivers that to
# every process of the job's steps, and SIGURG is ignored by default, so only this wrapper reacts.
# Delivering SIGUSR1 itself to every process would kill processes that do not expect it:
# torchrun (it handles TERM/INT/HUP/QUIT only) and the ranks' helpers, e.g. megatron's checkpoint
# writer (a spawned multiprocessing Manager; the next save then fails with EOFError).
# CMD starts with SIGUSR1 ignored (kept across exec): a rank still starting up ignores a stop
# request instead of dying of it (the trainer installs its handler when its setup ends; the
# batch shell repeats the request). Exit status: CMD's.
set -u
mode=$1
shift
trap '' USR1 # inherited by CMD and everything it starts
"$@" &
child=$!
# shellcheck disable=SC2317  # (run by the trap)
stop_ranks() {
    if [[ $mode == self ]]; then
        kill -USR1 "$child" 2>/dev/null
        return 0
    fi
    local status key value # the children of CMD: scan /proc (no procps needed)
    for status in /proc/[0-9]*/status; do
        while read -r key value; do
            [[ $key == PPid: ]] && break
        done <"$status" 2>/dev/null
        if [[ $key == PPid: && $value == "$child" ]]; then
            status=${status#/proc/}
            kill -USR1 "${status%/status}" 2>/dev/null
        fi
    done
    return 0
}
trap stop_ranks URG
# SIGTERM (scancel, time limit, preemption) reaches CMD directly from Slurm; stay alive while CMD
# saves and exits (dying here would end the Slurm task and kill CMD mid-save).
trap ':' TERM
status=0
while :; do # `wait` returns early (status > 128) whenever a trap ran
    wait "$child"
    status=$?
    kill -0 "$child" 2>/dev/null || break
done
if ((status > 128)); then # the last wait may have been cut short just as CMD exited
    wait "$child"
    last=$?
    ((last == 127)) || status=$last
fi
exit "$status"
