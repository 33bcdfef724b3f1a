# Build and install mirrorfs the way a Debian system expects it.
#   make                      build the release binary (cargo build --release -p mirrorfs)
#   make install              install into $(DESTDIR)$(PREFIX) (as root: PREFIX=/usr, the default)
#   make install DESTDIR=/tmp/stage PREFIX=/usr/local
#   make uninstall
# What goes where (PREFIX=/usr):
#   /usr/bin/mirrorfs                          the binary
#   /sbin/mount.fuse.mirrorfs, mount.mirrorfs   mount helpers (symlinks to the binary), found by
#                                              mount(8) for `-t fuse.mirrorfs` and fstab lines
#   /lib/systemd/system/mirrorfs@.service, mirrorfs-serve@.service
#   /usr/share/man/man1/mirrorfs*.1.gz          one page per subcommand
#   /usr/share/bash-completion/completions/mirrorfs, zsh vendor-completions/_mirrorfs,
#   fish vendor_completions.d/mirrorfs.fish
PREFIX ?= /usr
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
SBINDIR ?= /sbin
UNITDIR ?= /lib/systemd/system
MANDIR ?= $(PREFIX)/share/man/man1
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR ?= $(PREFIX)/share/zsh/vendor-completions
FISHCOMPDIR ?= $(PREFIX)/share/fish/vendor_completions.d
CARGO ?= cargo
BIN := target/release/mirrorfs
GEN := target/gen

.PHONY: all build gen install uninstall clean-gen

all: build

build:
	$(CARGO) build --release -p mirrorfs

# Man pages and completions, generated from the binary's own command-line definitions.
gen: build
	rm -rf $(GEN)
	mkdir -p $(GEN)/man $(GEN)/completions
	$(BIN) man $(GEN)/man >/dev/null
	gzip -9n $(GEN)/man/*.1
	$(BIN) completion bash > $(GEN)/completions/mirrorfs
	$(BIN) completion zsh > $(GEN)/completions/_mirrorfs
	$(BIN) completion fish > $(GEN)/completions/mirrorfs.fish

install: gen
	install -D -m 755 $(BIN) $(DESTDIR)$(BINDIR)/mirrorfs
	install -d $(DESTDIR)$(SBINDIR)
	ln -sf $(BINDIR)/mirrorfs $(DESTDIR)$(SBINDIR)/mount.fuse.mirrorfs
	ln -sf $(BINDIR)/mirrorfs $(DESTDIR)$(SBINDIR)/mount.mirrorfs
	install -d $(DESTDIR)$(UNITDIR)
	for u in packaging/systemd/*.service; do \
		sed 's#/usr/bin/mirrorfs#$(BINDIR)/mirrorfs#' $$u > $(DESTDIR)$(UNITDIR)/$$(basename $$u); \
		chmod 644 $(DESTDIR)$(UNITDIR)/$$(basename $$u); \
	done
	install -d $(DESTDIR)$(MANDIR)
	install -m 644 $(GEN)/man/*.1.gz $(DESTDIR)$(MANDIR)/
	install -D -m 644 $(GEN)/completions/mirrorfs $(DESTDIR)$(BASHCOMPDIR)/mirrorfs
	install -D -m 644 $(GEN)/completions/_mirrorfs $(DESTDIR)$(ZSHCOMPDIR)/_mirrorfs
	install -D -m 644 $(GEN)/completions/mirrorfs.fish $(DESTDIR)$(FISHCOMPDIR)/mirrorfs.fish

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/mirrorfs $(DESTDIR)$(SBINDIR)/mount.fuse.mirrorfs \
		$(DESTDIR)$(SBINDIR)/mount.mirrorfs \
		$(DESTDIR)$(UNITDIR)/mirrorfs@.service $(DESTDIR)$(UNITDIR)/mirrorfs-serve@.service \
		$(DESTDIR)$(MANDIR)/mirrorfs.1.gz $(DESTDIR)$(MANDIR)/mirrorfs-*.1.gz \
		$(DESTDIR)$(BASHCOMPDIR)/mirrorfs $(DESTDIR)$(ZSHCOMPDIR)/_mirrorfs \
		$(DESTDIR)$(FISHCOMPDIR)/mirrorfs.fish
