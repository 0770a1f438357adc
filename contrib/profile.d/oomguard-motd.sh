# oomguard: at each interactive login, tell the user what happened to their
# processes since the last one (kernel OOM kills, runs the healer stopped).
# Silent when nothing happened or the daemon is not running; never blocks a
# login for more than a couple of seconds.
case $- in
    *i*) command -v oomguard >/dev/null 2>&1 && oomguard motd 2>/dev/null ;;
esac
true
