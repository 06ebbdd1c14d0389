# resilua — build, test, sanitizers, install, demo.  `make help` lists targets.

PREFIX    ?= /usr/local
DESTDIR   ?=
BUILD     ?= build
LUA       ?= lua5.4
BUSTED    ?= busted
SANITIZE  ?=
VERSION   := 0.1.0

PKGS      := lua5.4 libcurl libnghttp2
CPPFLAGS  += $(shell pkg-config --cflags $(PKGS)) -D_GNU_SOURCE \
             -DRSL_VERSION='"$(VERSION)"'
WARN      := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes \
             -Wmissing-prototypes -Wpointer-arith -Wundef -Wvla \
             -Wno-unused-parameter
CFLAGS    ?= -O2 -g
ALL_CFLAGS = -std=c11 $(WARN) -fPIC -MMD -MP $(CFLAGS)
LDLIBS    := $(shell pkg-config --libs $(PKGS)) -lhttp_parser -lm
ifneq ($(SANITIZE),)
  ALL_CFLAGS += -fsanitize=$(SANITIZE) -fno-omit-frame-pointer \
                -fno-sanitize-recover=all
  LDFLAGS    += -fsanitize=$(SANITIZE)
endif
ifeq ($(V),1)
  Q :=
else
  Q := @
endif

CORE_SRC  := $(filter-out src/main.c,$(wildcard src/*.c src/*/*.c))
CORE_OBJ  := $(CORE_SRC:src/%.c=$(BUILD)/obj/%.o)
LUA_SRC   := $(wildcard lua/resilua/*.lua)
BIN       := $(BUILD)/bin/resilua
CORE_SO   := $(BUILD)/lib/resilua/core.so

.PHONY: all deps test test-spec test-asan bench demo demo-call install uninstall lint clean help

all: $(BIN) $(CORE_SO)

# src/ is grouped by layer (src/grpc/, src/http2/): objects mirror it.
$(BUILD)/obj/%.o: src/%.c
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $<")
	$(Q)$(CC) $(CPPFLAGS) $(ALL_CFLAGS) -c -o $@ $<

# The Lua half of the API is compiled into the binary.
$(BUILD)/gen/embedded_lua.c: tools/embed.lua $(LUA_SRC)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  EMBED   $@")
	$(Q)$(LUA) tools/embed.lua $@ $(LUA_SRC)

$(BUILD)/obj/embedded_lua.o: $(BUILD)/gen/embedded_lua.c
	@$(if $(Q),echo "  CC      $<")
	$(Q)$(CC) $(CPPFLAGS) $(ALL_CFLAGS) -Isrc -c -o $@ $<

$(BIN): $(CORE_OBJ) $(BUILD)/obj/main.o $(BUILD)/obj/embedded_lua.o
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(CORE_SO): $(CORE_OBJ) $(BUILD)/obj/embedded_lua.o
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -shared $(LDFLAGS) -o $@ $^ $(shell pkg-config --libs libcurl libnghttp2) -lhttp_parser -lm

# Specs run against the binary; busted itself runs inside it (`resilua run`),
# so the sanitizer build checks the in-process Lua API too.
# On a fresh Debian machine, `make test` and `make demo` first install what
# is missing (tools/deps.sh).
deps:
	$(Q)tools/deps.sh

# chromium: the report spec renders report.html with it; python3-requests,
# promtool (prometheus) and the OpenAI Node SDK are the proxy specs' peers.
test:
	$(Q)tools/deps.sh chromium python3-requests prometheus
	$(Q)tools/node-deps.sh >/dev/null
	$(Q)$(MAKE) --no-print-directory all
	$(Q)$(MAKE) --no-print-directory test-spec
	$(Q)$(MAKE) --no-print-directory test-asan

test-spec: all
	$(Q)RESILUA_BIN=$(abspath $(BIN)) $(BIN) run $$(command -v $(BUSTED)) $(BUSTED_ARGS)

ASAN_DIR := build-asan
test-asan:
	$(Q)$(MAKE) --no-print-directory BUILD=$(ASAN_DIR) SANITIZE=address,undefined all
	$(Q)rm -rf $(ASAN_DIR)/reports && mkdir -p $(ASAN_DIR)/reports
	$(Q)ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:log_path=$(abspath $(ASAN_DIR))/reports/asan \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$(abspath $(ASAN_DIR))/reports/ubsan \
	  RESILUA_BIN=$(abspath $(ASAN_DIR)/bin/resilua) \
	  $(ASAN_DIR)/bin/resilua run $$(command -v $(BUSTED)) $(BUSTED_ARGS)
	$(Q)if [ -n "$$(ls -A $(ASAN_DIR)/reports)" ]; then \
	  cat $(ASAN_DIR)/reports/*; echo "sanitizer findings: see above" >&2; exit 1; \
	else echo "sanitizers: no findings"; fi

# wrk and hey are the peers the figures are compared with, nginx the
# upstream of bench/peers.lua (nginx-light, unless an nginx is installed).
bench:
	$(Q)tools/deps.sh wrk hey haproxy python3 $$(command -v nginx >/dev/null 2>&1 || \
	  [ -x /usr/sbin/nginx ] || echo nginx-light)
	$(Q)$(MAKE) --no-print-directory all
	$(Q)$(BIN) run bench/run.lua
	$(Q)$(BIN) run bench/batch.lua
	$(Q)$(BIN) run bench/reload.lua
	$(Q)$(BIN) run bench/sandbox.lua
	$(Q)$(BIN) run bench/peers.lua
	$(Q)$(BIN) run bench/proxy.lua
	$(Q)$(BIN) run bench/grpc.lua

# The main job: four policies through an outage and a capacity drop.
# tools/deps.sh (apt-get) runs only when the build or cjson is missing.
NEED_DEPS = ! $(MAKE) --no-print-directory all >/dev/null 2>&1 || \
            ! $(LUA) -e 'require "cjson"' >/dev/null 2>&1
demo:
	$(Q)if $(NEED_DEPS); then tools/deps.sh && $(MAKE) --no-print-directory all; fi
	$(Q)$(BIN) run experiments/outage.lua

demo-call:
	$(Q)if $(NEED_DEPS); then tools/deps.sh && $(MAKE) --no-print-directory all; fi
	$(Q)sh tools/demo-call.sh $(BIN)

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib/lua/5.4/resilua \
	  $(DESTDIR)$(PREFIX)/share/lua/5.4/resilua $(DESTDIR)$(PREFIX)/share/resilua/policies \
	  $(DESTDIR)$(PREFIX)/share/resilua/examples $(DESTDIR)$(PREFIX)/share/resilua/experiments
	install -m 755 $(BIN) $(DESTDIR)$(PREFIX)/bin/resilua
	install -m 644 $(CORE_SO) $(DESTDIR)$(PREFIX)/lib/lua/5.4/resilua/core.so
	install -m 644 $(LUA_SRC) $(DESTDIR)$(PREFIX)/share/lua/5.4/resilua/
	install -m 644 policies/*.lua $(DESTDIR)$(PREFIX)/share/resilua/policies/
	install -m 644 examples/*.lua $(DESTDIR)$(PREFIX)/share/resilua/examples/
	install -m 644 experiments/*.lua $(DESTDIR)$(PREFIX)/share/resilua/experiments/

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/resilua $(DESTDIR)$(PREFIX)/lib/lua/5.4/resilua/core.so
	rm -rf $(DESTDIR)$(PREFIX)/share/lua/5.4/resilua $(DESTDIR)$(PREFIX)/share/resilua

lint:
	cppcheck --quiet --error-exitcode=1 --enable=warning,portability \
	  --suppress=missingIncludeSystem -I src src

clean:
	rm -rf $(BUILD) $(ASAN_DIR)

help:
	@echo "make          build $(BIN) and $(CORE_SO)"
	@echo "make test     specs, then specs again under ASan+UBSan"
	@echo "make demo     experiments/outage.lua: 4 policies through an outage; report.html"
	@echo "make demo-call  flaky upstream + a call that succeeds after retries"
	@echo "make bench    decide round trip, calls/s, RSS; resilua load vs wrk and hey;"
	@echo "              resilua proxy: overhead, vs nginx and HAProxy, RSS; gRPC"
	@echo "make install  PREFIX=$(PREFIX) DESTDIR=...: the binary, the Lua module, the policies,"
	@echo "              examples and experiments (PREFIX/share/resilua)"

-include $(wildcard $(BUILD)/obj/*.d $(BUILD)/obj/*/*.d)
