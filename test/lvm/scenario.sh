# Scenario helpers shared by the in-guest scripts (e2e.sh, thin.sh): the
# host test puts this file in front of each script (scenarioScript in
# e2e_test.go). A script sets TAG (the prefix of its log lines) before
# calling them. Busybox sh.

now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
say() { echo "$TAG: $*"; }
timing() { echo "TIME $1 $(since "$2")s"; }
# show FILE: a command's stderr on the console, indented.
show() { sed 's/^/    | /' "$1"; }
lastline() { tail -n 1 "$1" | cut -c1-300; }

SC=""
SC_T=0
SC_FAIL=""
ALL_OK=1
begin() {
	SC=$1
	SC_T=$(now)
	SC_FAIL=""
	say "== scenario $SC"
}
fail() {
	say "FAIL ($SC): $*"
	SC_FAIL="${SC_FAIL:+$SC_FAIL; }$*"
}
finish() {
	if [ -z "$SC_FAIL" ]; then
		echo "SCENARIO $SC PASS $(since "$SC_T")s $*"
	else
		echo "SCENARIO $SC FAIL $(since "$SC_T")s $SC_FAIL"
		ALL_OK=0
	fi
}
setup_fail() {
	echo "SETUP FAIL $*"
	exit 1
}
