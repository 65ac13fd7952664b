# cmk_lakebase: transparent data encryption with customer-managed keys for stock
# PostgreSQL. Three artifacts, layered one way (STYLE.md):
#   libcmk_lakebase_fs.so  the encrypting file layer + crypto, key map, keyring and
#                          key providers; no reference to server symbols, so it can be
#                          LD_PRELOADed into initdb and the other stock tools
#   cmk_lakebase.so        the PostgreSQL module (PGXS MODULE_big); links the layer
#   pg_cmk                 the command-line tool (initdb, exec, status, key commands)
# Plus build/cmk_unit_tests (GoogleTest) for the pure C++ layers.

EXTENSION = cmk_lakebase
EXTVERSION = $(shell grep default_version $(EXTENSION).control | sed -e "s/default_version[[:space:]]*=[[:space:]]*'\([^']*\)'/\1/")
MODULE_big = cmk_lakebase
PG_SRCS = $(sort $(wildcard src/pg/*.cpp))
OBJS = $(PG_SRCS:.cpp=.o)
DATA_built = sql/$(EXTENSION)--$(EXTVERSION).sql
# Upgrade steps, and frozen install scripts of earlier versions (to test upgrades).
DATA = $(sort $(wildcard sql/$(EXTENSION)--*--*.sql)) sql/$(EXTENSION)--0.1.0.sql
EXTRA_CLEAN = build sql/$(EXTENSION)--$(EXTVERSION).sql $(CORE_OBJS) $(FS_OBJS) $(CLI_OBJS) \
	$(UNIT_OBJS) $(LAYER_TEST_OBJS)

# pg_regress runs against an encrypted instance started by test/run_regress.sh; its
# inputs are test/sql/*.sql and test/expected/*.out (sql/ holds only the extension's
# install and upgrade scripts).
REGRESS = cmk_status cmk_lifecycle
REGRESS_OPTS = --inputdir=test

PG_CONFIG ?= pg_config
# Every header: the public ones by audience (base, kms, keys, fs) and core's internal
# provider headers. Any change rebuilds everything (the tree is small).
CMK_HEADERS = $(wildcard include/cmk_lakebase/*/*.hpp src/core/*/*.hpp src/fs/*.hpp)
# No JIT bitcode for a C++ module (would need clang at build time for nothing).
override with_llvm = no

WERROR ?=
CMK_CXXFLAGS = -std=c++17 -fPIC -Iinclude -Wall -Wextra $(WERROR) -O2 -g -fvisibility-inlines-hidden
PG_CXXFLAGS = $(CMK_CXXFLAGS)
LAYER = build/libcmk_lakebase_fs.so
SHLIB_LINK = -Lbuild -lcmk_lakebase_fs -Wl,-rpath,'$(pkglibdir)' -lstdc++

PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

PG_BINDIR := $(shell $(PG_CONFIG) --bindir)
PG_PKGLIBDIR := $(shell $(PG_CONFIG) --pkglibdir)

CORE_SRCS = $(sort $(wildcard src/core/*/*.cpp))
FS_SRCS = $(sort $(wildcard src/fs/*.cpp))
CLI_SRCS = $(sort $(wildcard src/cli/*.cpp))
UNIT_SRCS = $(sort $(wildcard test/unit/*.cpp))
LAYER_TEST_SRCS = $(sort $(wildcard test/layer/*.cpp))
LAYER_TEST_OBJS = $(LAYER_TEST_SRCS:.cpp=.o)
CORE_OBJS = $(CORE_SRCS:.cpp=.o)
FS_OBJS = $(FS_SRCS:.cpp=.o)
CLI_OBJS = $(CLI_SRCS:.cpp=.o)
UNIT_OBJS = $(UNIT_SRCS:.cpp=.o)
CORE_LIBS = -lssl -lcrypto -lcurl -ldl -lpthread

# Compiled-in locations, so that pg_cmk finds initdb and the layer without a PATH.
CMK_DEFS = -DCMK_PG_BINDIR='"$(PG_BINDIR)"' -DCMK_PKGLIBDIR='"$(PG_PKGLIBDIR)"' \
	-DCMK_VERSION='"$(EXTVERSION)"'

src/core/%.o: src/core/%.cpp $(CMK_HEADERS)
	$(CXX) $(CMK_CXXFLAGS) $(CMK_DEFS) -c -o $@ $<

# The interposers define open(), read(), ...: glibc's fortify wrappers must be off here.
# initial-exec TLS: the layer's per-thread state is reached on every I/O without a
# __tls_get_addr call (it is loaded at startup, where static TLS has room for it).
src/fs/%.o: src/fs/%.cpp $(CMK_HEADERS)
	$(CXX) $(CMK_CXXFLAGS) $(CMK_DEFS) -ftls-model=initial-exec -U_FORTIFY_SOURCE -D_FORTIFY_SOURCE=0 -c -o $@ $<

src/cli/%.o: src/cli/%.cpp $(CMK_HEADERS)
	$(CXX) $(CMK_CXXFLAGS) $(CMK_DEFS) -c -o $@ $<

src/pg/%.o: src/pg/%.cpp $(CMK_HEADERS)
	$(CXX) $(CMK_CXXFLAGS) $(CMK_DEFS) -isystem $(includedir_server) $(CPPFLAGS) -c -o $@ $<

test/layer/%.o: test/layer/%.cpp $(CMK_HEADERS)
	$(CXX) $(CMK_CXXFLAGS) $(CMK_DEFS) -c -o $@ $<

test/unit/%.o: test/unit/%.cpp $(CMK_HEADERS)
	$(CXX) $(CMK_CXXFLAGS) $(CMK_DEFS) -Isrc -c -o $@ $<

$(LAYER): $(CORE_OBJS) $(FS_OBJS)
	@mkdir -p build
	$(CXX) -shared -o $@ $^ -Wl,-soname,libcmk_lakebase_fs.so -Wl,-z,now $(CORE_LIBS)

build/pg_cmk: $(CLI_OBJS) $(CORE_OBJS)
	@mkdir -p build
	$(CXX) -o $@ $^ $(CORE_LIBS)

build/cmk_unit_tests: $(UNIT_OBJS) $(CORE_OBJS)
	@mkdir -p build
	$(CXX) -o $@ $^ -lgtest -lgtest_main $(CORE_LIBS)

# Run with the layer preloaded by itself (see test/layer/layer_test.cpp).
build/cmk_layer_tests: $(LAYER_TEST_OBJS) $(CORE_OBJS) $(LAYER)
	@mkdir -p build
	$(CXX) -o $@ $(LAYER_TEST_OBJS) $(CORE_OBJS) -lgtest $(CORE_LIBS)

# The same units under AddressSanitizer and UBSan (STYLE.md): one compile, own directory.
SANITIZE = -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
build/sanitize/cmk_unit_tests: $(CORE_SRCS) $(UNIT_SRCS) $(CMK_HEADERS)
	@mkdir -p build/sanitize
	$(CXX) $(CMK_CXXFLAGS) $(CMK_DEFS) -Isrc $(SANITIZE) -o $@ $(CORE_SRCS) $(UNIT_SRCS) -lgtest -lgtest_main $(CORE_LIBS)

unit-sanitize: build/sanitize/cmk_unit_tests

# libFuzzer targets (fuzz/*.cpp, test/run_fuzz.sh) over the parsers of untrusted bytes.
# The core is compiled again with clang and the fuzzer's instrumentation into its own
# directory, apart from the g++ objects of the normal build.
FUZZ_CXX ?= $(shell command -v clang++-14 || command -v clang++)
FUZZ_FLAGS = -std=c++17 -Iinclude -Isrc -fsanitize=fuzzer-no-link,address,undefined \
	-fno-sanitize-recover=undefined -fsanitize-ignorelist=fuzz/ubsan_ignore.txt \
	-fno-omit-frame-pointer -g -O1
FUZZ_SRCS = $(sort $(wildcard fuzz/fuzz_*.cpp))
FUZZ_BINS = $(patsubst fuzz/%.cpp,build/fuzz/%,$(FUZZ_SRCS))
FUZZ_CORE_OBJS = $(patsubst src/core/%.cpp,build/fuzz/core/%.o,$(CORE_SRCS))

build/fuzz/core/%.o: src/core/%.cpp $(CMK_HEADERS) fuzz/ubsan_ignore.txt
	@mkdir -p $(dir $@)
	$(FUZZ_CXX) $(FUZZ_FLAGS) $(CMK_DEFS) -c -o $@ $<

build/fuzz/%: fuzz/%.cpp fuzz/fuzz_common.hpp $(CMK_HEADERS) $(FUZZ_CORE_OBJS)
	@mkdir -p build/fuzz
	$(FUZZ_CXX) $(FUZZ_FLAGS) -fsanitize=fuzzer $(CMK_DEFS) -o $@ $< $(FUZZ_CORE_OBJS) $(CORE_LIBS)

fuzz: $(FUZZ_BINS)
.PHONY: fuzz

$(shlib): $(LAYER)

all: $(LAYER) build/pg_cmk

unit: build/cmk_unit_tests build/cmk_layer_tests

sql/$(EXTENSION)--$(EXTVERSION).sql: sql/$(EXTENSION).sql
	cp $< $@

install: install-cmk
.PHONY: install-cmk unit unit-sanitize
install-cmk: $(LAYER) build/pg_cmk
	$(INSTALL_SHLIB) $(LAYER) '$(DESTDIR)$(pkglibdir)/libcmk_lakebase_fs.so'
	$(INSTALL_PROGRAM) build/pg_cmk '$(DESTDIR)$(bindir)/pg_cmk'
