/* The memory store's map of customer key to state, read and written a batch at a time.
 *
 * Why it exists (docs/performance.md, "The state table in C"): a worker grading a million customers spent half of
 * what an event costs more there than among ten thousand in two dict operations per customer, the
 * read of its state and the write of the new one. A dict lookup is a chain of dependent cache
 * misses (index slot, entry, stored key, value) and CPython runs one at a time, so a batch's 2,000
 * lookups wait for ~8,000 misses in a row. Here a batch's keys are looked up in stages: all slots
 * are prefetched, then all stored keys and values, then the values' bytes, so that the misses of
 * one stage overlap instead of queueing. Among ten thousand customers everything is in cache and a
 * stage costs a few nanoseconds per key: no fixed cost where there is nothing to win.
 *
 * The table: open addressing with linear probing over slots of (fingerprint, key, value). The
 * fingerprint is the key's hash (0 is never a fingerprint: it marks a slot never used). A deleted
 * key leaves its fingerprint with no key (a tombstone), so that probes for keys placed after it go
 * on past it; an insert takes the first slot on its path that holds no key. The table grows when
 * two thirds of its slots were ever used, and a rebuild (which drops the tombstones) leaves at most
 * half of them used. Keys are exact ``bytes`` (hashing and comparing them runs no Python code, so
 * nothing can change the table in the middle of an operation); values are any objects. Values
 * replaced or removed are released only once the table is consistent again, because releasing one
 * may run arbitrary code.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH(p) __builtin_prefetch((const void *)(p))
#else
#define PREFETCH(p) ((void)0)
#endif

#define MIN_CAPACITY 16
#define LINE 64
/* Lines of a value's bytes prefetched after a batch read: a customer's state is ~400 bytes. */
#define VALUE_LINES 16

typedef struct {
    Py_hash_t fp;  /* 0: never used */
    PyObject *key; /* NULL with fp != 0: a tombstone */
    PyObject *val;
} Slot;

typedef struct {
    PyObject_HEAD
    Slot *slots;
    size_t mask;       /* capacity - 1 */
    Py_ssize_t len;    /* live keys */
    Py_ssize_t used;   /* live keys and tombstones */
    Py_hash_t fp_mask; /* bits of the hash kept as fingerprint: all, except in tests of collisions */
} StateTable;

/* Objects to release once the table is consistent again. */
typedef struct {
    PyObject **items;
    Py_ssize_t n, cap;
} Garbage;

static int garbage_add(Garbage *g, PyObject *o) {
    if (o == NULL) return 0;
    if (g->n == g->cap) {
        Py_ssize_t cap = g->cap ? g->cap * 2 : 64;
        PyObject **items = PyMem_Realloc(g->items, (size_t)cap * sizeof(PyObject *));
        if (items == NULL) {
            /* Cannot defer: release now (a leak would be worse than the rare re-entry risk). */
            Py_DECREF(o);
            return 0;
        }
        g->items = items;
        g->cap = cap;
    }
    g->items[g->n++] = o;
    return 0;
}

static void garbage_release(Garbage *g) {
    for (Py_ssize_t i = 0; i < g->n; i++) Py_DECREF(g->items[i]);
    PyMem_Free(g->items);
    g->items = NULL;
    g->n = g->cap = 0;
}

/* Keys are exact bytes, whose hash cannot fail (and is never -1). */
static inline Py_hash_t fingerprint(StateTable *t, PyObject *key) {
    Py_hash_t h = PyObject_Hash(key) & t->fp_mask;
    return h == 0 ? 1 : h;
}

static inline int same_key(PyObject *stored, PyObject *key) {
    if (stored == key) return 1;
    Py_ssize_t n = PyBytes_GET_SIZE(key);
    return PyBytes_GET_SIZE(stored) == n && memcmp(PyBytes_AS_STRING(stored), PyBytes_AS_STRING(key), (size_t)n) == 0;
}

static int check_key(PyObject *key) {
    if (!PyBytes_CheckExact(key)) {
        PyErr_Format(PyExc_TypeError, "StateTable keys are bytes, not %.100s", Py_TYPE(key)->tp_name);
        return -1;
    }
    return 0;
}

/* The slot of key, or -1; probing from p. */
static Py_ssize_t find_from(StateTable *t, PyObject *key, Py_hash_t h, size_t p) {
    Slot *slots = t->slots;
    for (;;) {
        Slot *s = &slots[p];
        if (s->fp == 0) return -1;
        if (s->fp == h && s->key != NULL && same_key(s->key, key)) return (Py_ssize_t)p;
        p = (p + 1) & t->mask;
    }
}

static Py_ssize_t find(StateTable *t, PyObject *key, Py_hash_t h) {
    return find_from(t, key, h, (size_t)h & t->mask);
}

/* The first slot on key's path that holds no key (key known absent). */
static size_t free_slot(StateTable *t, Py_hash_t h) {
    size_t p = (size_t)h & t->mask;
    while (t->slots[p].key != NULL) p = (p + 1) & t->mask;
    return p;
}

static int allocate(StateTable *t, size_t capacity) {
    Slot *slots = PyMem_Calloc(capacity, sizeof(Slot));
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    t->slots = slots;
    t->mask = capacity - 1;
    t->len = 0;
    t->used = 0;
    return 0;
}

/* Move every live key into a new table of `capacity` slots; tombstones are dropped. */
static int rebuild(StateTable *t, size_t capacity) {
    Slot *old = t->slots;
    size_t old_capacity = t->mask + 1;
    Py_ssize_t len = t->len;
    if (allocate(t, capacity) < 0) {
        t->slots = old;
        t->mask = old_capacity - 1;
        return -1;
    }
    for (size_t i = 0; i < old_capacity; i++) {
        if (old[i].key != NULL) {
            size_t p = free_slot(t, old[i].fp);
            t->slots[p] = old[i];
        }
    }
    t->len = t->used = len;
    PyMem_Free(old);
    return 0;
}

static size_t capacity_for(Py_ssize_t keys) {
    size_t capacity = MIN_CAPACITY;
    while (capacity < (size_t)keys * 2) capacity *= 2;
    return capacity;
}

/* Room for `more` new keys: at most two thirds of the slots ever used once they are in. */
static int reserve(StateTable *t, Py_ssize_t more) {
    size_t capacity = t->mask + 1;
    if (3 * (size_t)(t->used + more) <= 2 * capacity) return 0;
    size_t wanted = capacity_for(t->len + more);
    return rebuild(t, wanted > capacity ? wanted : capacity);
}

/* Look up n keys in stages whose cache misses overlap; pos[i] = slot or -1. hs: scratch. */
static int find_many(StateTable *t, PyObject **keys, Py_ssize_t n, Py_hash_t *hs, Py_ssize_t *pos,
                     int prefetch_values) {
    Slot *slots = t->slots;
    size_t mask = t->mask;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (check_key(keys[i]) < 0) return -1;
        Py_hash_t h = fingerprint(t, keys[i]);
        hs[i] = h;
        PREFETCH(&slots[(size_t)h & mask]);
    }
    /* The first slot with the key's fingerprint (or the end of its path); its key and value. */
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_hash_t h = hs[i];
        size_t p = (size_t)h & mask;
        Py_ssize_t at = -1;
        for (;;) {
            Slot *s = &slots[p];
            if (s->fp == 0) break;
            if (s->fp == h && s->key != NULL) {
                at = (Py_ssize_t)p;
                PREFETCH(s->key);
                PREFETCH(s->val);
                break;
            }
            p = (p + 1) & mask;
        }
        pos[i] = at;
    }
    /* The keys compared (another key with the same fingerprint: probe on), the values' bytes. */
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t at = pos[i];
        if (at < 0) continue;
        if (!same_key(slots[at].key, keys[i])) {
            at = find_from(t, keys[i], hs[i], ((size_t)at + 1) & mask);
            pos[i] = at;
            if (at < 0) continue;
        }
        if (prefetch_values) {
            PyObject *v = slots[at].val;
            if (PyBytes_CheckExact(v)) {
                const char *start = (const char *)v;
                const char *end = PyBytes_AS_STRING(v) + PyBytes_GET_SIZE(v);
                int lines = 1;
                for (const char *a = start + LINE; a < end && lines < VALUE_LINES; a += LINE, lines++) PREFETCH(a);
            }
        }
    }
    return 0;
}

/* A list's or tuple's items as an array (borrowed), after PySequence_Fast. */
static PyObject *as_sequence(PyObject *o, const char *what) {
    return PySequence_Fast(o, what);
}

/* ---- batches --------------------------------------------------------------------------------- */

PyDoc_STRVAR(get_many_doc,
"get_many(keys, /)\n--\n\n"
"The value of each key (None where absent), in order, looked up as a batch whose cache misses\n"
"overlap.");

static PyObject *StateTable_get_many(StateTable *t, PyObject *arg) {
    PyObject *seq = as_sequence(arg, "get_many takes a sequence of keys");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **keys = PySequence_Fast_ITEMS(seq);
    PyObject *out = PyList_New(n);
    Py_hash_t *hs = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(Py_hash_t));
    Py_ssize_t *pos = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(Py_ssize_t));
    if (out == NULL || hs == NULL || pos == NULL) {
        if (out != NULL && (hs == NULL || pos == NULL)) PyErr_NoMemory();
        goto fail;
    }
    if (find_many(t, keys, n, hs, pos, 1) < 0) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = pos[i] >= 0 ? t->slots[pos[i]].val : Py_None;
        Py_INCREF(v);
        PyList_SET_ITEM(out, i, v);
    }
    PyMem_Free(hs);
    PyMem_Free(pos);
    Py_DECREF(seq);
    return out;
fail:
    Py_XDECREF(out);
    PyMem_Free(hs);
    PyMem_Free(pos);
    Py_DECREF(seq);
    return NULL;
}

/* Set keys[i] to vals[i] in order (a repeated key ends with its last value). New keys' indices
 * (their first occurrence) are appended to `new` when it is not NULL. */
static int set_many(StateTable *t, PyObject **keys, PyObject **vals, Py_ssize_t n, PyObject *new) {
    int rc = -1;
    Garbage garbage = {NULL, 0, 0};
    Py_hash_t *hs = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(Py_hash_t));
    Py_ssize_t *pos = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(Py_ssize_t));
    if (hs == NULL || pos == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (find_many(t, keys, n, hs, pos, 0) < 0) goto done;
    Py_ssize_t absent = 0;
    for (Py_ssize_t i = 0; i < n; i++) absent += pos[i] < 0;
    if (absent) {
        size_t before = t->mask + 1;
        Slot *slots = t->slots;
        if (reserve(t, absent) < 0) goto done;
        if (t->slots != slots || t->mask + 1 != before) {
            for (Py_ssize_t i = 0; i < n; i++) pos[i] = find(t, keys[i], hs[i]);  /* keys moved */
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = vals[i];
        Py_ssize_t at = pos[i] >= 0 ? pos[i] : find(t, keys[i], hs[i]);  /* maybe placed earlier in this batch */
        if (at >= 0) {
            Slot *s = &t->slots[at];
            PyObject *old = s->val;
            Py_INCREF(v);
            s->val = v;
            garbage_add(&garbage, old);
            continue;
        }
        size_t p = free_slot(t, hs[i]);
        Slot *s = &t->slots[p];
        if (s->fp == 0) t->used++;
        s->fp = hs[i];
        Py_INCREF(keys[i]);
        s->key = keys[i];
        Py_INCREF(v);
        s->val = v;
        t->len++;
        if (new != NULL) {
            PyObject *index = PyLong_FromSsize_t(i);
            if (index == NULL || PyList_Append(new, index) < 0) {
                Py_XDECREF(index);
                goto done;  /* the table is consistent: every write so far is complete */
            }
            Py_DECREF(index);
        }
    }
    rc = 0;
done:
    PyMem_Free(hs);
    PyMem_Free(pos);
    garbage_release(&garbage);
    return rc;
}

PyDoc_STRVAR(set_many_doc,
"set_many(keys, values, /)\n--\n\n"
"Set each key to its value, in order (a repeated key ends with its last value); return the\n"
"indices, in keys, of the keys that were new (the first occurrence of each).");

static PyObject *StateTable_set_many(StateTable *t, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set_many takes keys and values");
        return NULL;
    }
    PyObject *ks = as_sequence(args[0], "set_many takes a sequence of keys");
    if (ks == NULL) return NULL;
    PyObject *vs = as_sequence(args[1], "set_many takes a sequence of values");
    if (vs == NULL) {
        Py_DECREF(ks);
        return NULL;
    }
    PyObject *new = NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(ks);
    if (PySequence_Fast_GET_SIZE(vs) != n) {
        PyErr_Format(PyExc_ValueError, "%zd keys for %zd values", n, PySequence_Fast_GET_SIZE(vs));
        goto done;
    }
    new = PyList_New(0);
    if (new != NULL && set_many(t, PySequence_Fast_ITEMS(ks), PySequence_Fast_ITEMS(vs), n, new) < 0) Py_CLEAR(new);
done:
    Py_DECREF(ks);
    Py_DECREF(vs);
    return new;
}

/* Remove each key present; the number removed, or -1. */
static Py_ssize_t delete_many(StateTable *t, PyObject **keys, Py_ssize_t n) {
    Garbage garbage = {NULL, 0, 0};
    Py_ssize_t removed = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (check_key(keys[i]) < 0) goto fail;
        Py_hash_t h = fingerprint(t, keys[i]);
        Py_ssize_t at = find(t, keys[i], h);
        if (at < 0) continue;
        Slot *s = &t->slots[at];
        garbage_add(&garbage, s->key);
        garbage_add(&garbage, s->val);
        s->key = NULL;  /* the fingerprint stays: a tombstone */
        s->val = NULL;
        t->len--;
        removed++;
    }
    /* More tombstones than keys: rebuild (a rebalance that drops most keys also shrinks). */
    if (t->used - t->len > t->len && t->used > MIN_CAPACITY / 2) {
        size_t wanted = capacity_for(t->len);
        size_t capacity = t->mask + 1;
        if (rebuild(t, wanted < capacity ? wanted : capacity) < 0) PyErr_Clear();  /* stays correct, only fuller */
    }
    garbage_release(&garbage);
    return removed;
fail:
    garbage_release(&garbage);
    return -1;
}

PyDoc_STRVAR(delete_many_doc,
"delete_many(keys, /)\n--\n\n"
"Remove each key present; return how many were.");

static PyObject *StateTable_delete_many(StateTable *t, PyObject *arg) {
    PyObject *seq = as_sequence(arg, "delete_many takes an iterable of keys");
    if (seq == NULL) return NULL;
    Py_ssize_t removed = delete_many(t, PySequence_Fast_ITEMS(seq), PySequence_Fast_GET_SIZE(seq));
    Py_DECREF(seq);
    return removed < 0 ? NULL : PyLong_FromSsize_t(removed);
}

/* ---- one key --------------------------------------------------------------------------------- */

static Py_ssize_t find_one(StateTable *t, PyObject *key) {
    if (check_key(key) < 0) return -2;
    return find(t, key, fingerprint(t, key));
}

static PyObject *StateTable_subscript(StateTable *t, PyObject *key) {
    Py_ssize_t at = find_one(t, key);
    if (at == -2) return NULL;
    if (at < 0) {
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    PyObject *v = t->slots[at].val;
    Py_INCREF(v);
    return v;
}

static int StateTable_ass_subscript(StateTable *t, PyObject *key, PyObject *value) {
    if (value == NULL) {
        if (check_key(key) < 0) return -1;
        Py_ssize_t removed = delete_many(t, &key, 1);
        if (removed < 0) return -1;
        if (removed == 0) {
            PyErr_SetObject(PyExc_KeyError, key);
            return -1;
        }
        return 0;
    }
    return set_many(t, &key, &value, 1, NULL);
}

static Py_ssize_t StateTable_length(StateTable *t) {
    return t->len;
}

static int StateTable_contains(StateTable *t, PyObject *key) {
    if (!PyBytes_CheckExact(key)) return 0;
    Py_ssize_t at = find_one(t, key);
    return at == -2 ? -1 : at >= 0;
}

PyDoc_STRVAR(get_doc, "get(key, default=None, /)\n--\n\nThe value of key, or default.");

static PyObject *StateTable_get(StateTable *t, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get takes a key and an optional default");
        return NULL;
    }
    PyObject *key = args[0];
    PyObject *v = nargs == 2 ? args[1] : Py_None;
    if (PyBytes_CheckExact(key)) {
        Py_ssize_t at = find_one(t, key);
        if (at == -2) return NULL;
        if (at >= 0) v = t->slots[at].val;
    }
    Py_INCREF(v);
    return v;
}

/* ---- whole table ----------------------------------------------------------------------------- */

/* 0: keys, 1: values, 2: (key, value) pairs; a snapshot list. */
static PyObject *listing(StateTable *t, int what) {
    PyObject *out = PyList_New(t->len);
    if (out == NULL) return NULL;
    Py_ssize_t j = 0;
    for (size_t i = 0; i <= t->mask; i++) {
        Slot *s = &t->slots[i];
        if (s->key == NULL) continue;
        PyObject *item;
        if (what == 2) {
            item = PyTuple_Pack(2, s->key, s->val);
            if (item == NULL) {
                Py_DECREF(out);
                return NULL;
            }
        } else {
            item = what == 0 ? s->key : s->val;
            Py_INCREF(item);
        }
        PyList_SET_ITEM(out, j++, item);
    }
    return out;
}

static PyObject *StateTable_keys(StateTable *t, PyObject *Py_UNUSED(ignored)) { return listing(t, 0); }
static PyObject *StateTable_values(StateTable *t, PyObject *Py_UNUSED(ignored)) { return listing(t, 1); }
static PyObject *StateTable_items(StateTable *t, PyObject *Py_UNUSED(ignored)) { return listing(t, 2); }

static PyObject *StateTable_iter(StateTable *t) {
    PyObject *keys = listing(t, 0);
    if (keys == NULL) return NULL;
    PyObject *it = PyObject_GetIter(keys);
    Py_DECREF(keys);
    return it;
}

/* Drop every key; the old slots' objects are released after the table is empty. */
static int clear_table(StateTable *t) {
    Slot *old = t->slots;
    size_t old_capacity = t->mask + 1;
    if (allocate(t, MIN_CAPACITY) < 0) {
        t->slots = old;
        t->mask = old_capacity - 1;
        return -1;
    }
    if (old != NULL) {
        for (size_t i = 0; i < old_capacity; i++) {
            Py_XDECREF(old[i].key);
            Py_XDECREF(old[i].val);
        }
        PyMem_Free(old);
    }
    return 0;
}

static PyObject *StateTable_clear(StateTable *t, PyObject *Py_UNUSED(ignored)) {
    if (clear_table(t) < 0) return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(update_doc,
"update(other=(), /)\n--\n\n"
"As dict.update, as one batch write: from a mapping or an iterable of (key, value) pairs.");

static PyObject *StateTable_update(StateTable *t, PyObject *args, PyObject *kwargs) {
    PyObject *other = NULL;
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs)) {
        PyErr_SetString(PyExc_TypeError, "StateTable keys are bytes, not keyword names");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "update", 0, 1, &other)) return NULL;
    if (other == NULL) Py_RETURN_NONE;
    PyObject *pairs;
    if (PyDict_Check(other)) {
        pairs = PyDict_Items(other);
    } else if (PyObject_HasAttrString(other, "keys") && PyObject_HasAttrString(other, "items")) {
        PyObject *items = PyObject_CallMethod(other, "items", NULL);
        pairs = items == NULL ? NULL : PySequence_List(items);
        Py_XDECREF(items);
    } else {
        pairs = PySequence_List(other);  /* runs a generator's side effects, as dict.update would */
    }
    if (pairs == NULL) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(pairs);
    PyObject *keys = PyList_New(n);
    PyObject *vals = PyList_New(n);
    if (keys == NULL || vals == NULL) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = PySequence_Fast(PyList_GET_ITEM(pairs, i), "update takes (key, value) pairs");
        if (pair == NULL) goto fail;
        if (PySequence_Fast_GET_SIZE(pair) != 2) {
            Py_DECREF(pair);
            PyErr_Format(PyExc_ValueError, "update's element #%zd has length %zd; 2 is required", i,
                         PySequence_Fast_GET_SIZE(pair));
            goto fail;
        }
        PyObject *k = PySequence_Fast_GET_ITEM(pair, 0), *v = PySequence_Fast_GET_ITEM(pair, 1);
        Py_INCREF(k);
        Py_INCREF(v);
        PyList_SET_ITEM(keys, i, k);
        PyList_SET_ITEM(vals, i, v);
        Py_DECREF(pair);
    }
    int rc = set_many(t, PySequence_Fast_ITEMS(keys), PySequence_Fast_ITEMS(vals), n, NULL);
    Py_DECREF(pairs);
    Py_DECREF(keys);
    Py_DECREF(vals);
    if (rc < 0) return NULL;
    Py_RETURN_NONE;
fail:
    Py_DECREF(pairs);
    Py_XDECREF(keys);
    Py_XDECREF(vals);
    return NULL;
}

static PyObject *StateTable_capacity(StateTable *t, void *Py_UNUSED(closure)) {
    return PyLong_FromSize_t(t->mask + 1);
}

static PyObject *StateTable_used(StateTable *t, void *Py_UNUSED(closure)) {
    return PyLong_FromSsize_t(t->used);
}

static PyObject *StateTable_sizeof(StateTable *t, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromSize_t(sizeof(StateTable) + (t->mask + 1) * sizeof(Slot));
}

/* ---- type ------------------------------------------------------------------------------------ */

static int StateTable_init(StateTable *t, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"items", "fingerprint_bits", NULL};
    PyObject *items = NULL;
    int bits = 64;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|O$i:StateTable", names, &items, &bits)) return -1;
    if (bits < 1 || bits > 64) {
        PyErr_SetString(PyExc_ValueError, "fingerprint_bits is 1 to 64");
        return -1;
    }
    if (clear_table(t) < 0) return -1;
    t->fp_mask = bits == 64 ? (Py_hash_t)-1 : (Py_hash_t)(((uint64_t)1 << bits) - 1);
    if (items != NULL) {
        PyObject *done = PyObject_CallMethod((PyObject *)t, "update", "O", items);
        if (done == NULL) return -1;
        Py_DECREF(done);
    }
    return 0;
}

static int StateTable_traverse(StateTable *t, visitproc visit, void *arg) {
    if (t->slots == NULL) return 0;
    for (size_t i = 0; i <= t->mask; i++) {
        Py_VISIT(t->slots[i].val);  /* keys are bytes: no references */
    }
    return 0;
}

static int StateTable_tp_clear(StateTable *t) {
    if (t->slots == NULL) return 0;
    Slot *old = t->slots;
    size_t capacity = t->mask + 1;
    t->slots = NULL;
    t->mask = 0;
    t->len = t->used = 0;
    for (size_t i = 0; i < capacity; i++) {
        Py_XDECREF(old[i].key);
        Py_XDECREF(old[i].val);
    }
    PyMem_Free(old);
    return 0;
}

static void StateTable_dealloc(StateTable *t) {
    PyObject_GC_UnTrack(t);
    Py_TRASHCAN_BEGIN(t, StateTable_dealloc)
    StateTable_tp_clear(t);
    Py_TYPE(t)->tp_free((PyObject *)t);
    Py_TRASHCAN_END
}

static PyObject *StateTable_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    StateTable *t = (StateTable *)type->tp_alloc(type, 0);
    if (t == NULL) return NULL;
    t->fp_mask = (Py_hash_t)-1;
    if (allocate(t, MIN_CAPACITY) < 0) {
        Py_DECREF(t);
        return NULL;
    }
    return (PyObject *)t;
}

static PyMethodDef StateTable_methods[] = {
    {"get_many", (PyCFunction)StateTable_get_many, METH_O, get_many_doc},
    {"set_many", (PyCFunction)(void (*)(void))StateTable_set_many, METH_FASTCALL, set_many_doc},
    {"delete_many", (PyCFunction)StateTable_delete_many, METH_O, delete_many_doc},
    {"get", (PyCFunction)(void (*)(void))StateTable_get, METH_FASTCALL, get_doc},
    {"keys", (PyCFunction)StateTable_keys, METH_NOARGS, "A list of the keys (a snapshot)."},
    {"values", (PyCFunction)StateTable_values, METH_NOARGS, "A list of the values (a snapshot)."},
    {"items", (PyCFunction)StateTable_items, METH_NOARGS, "A list of (key, value) pairs (a snapshot)."},
    {"clear", (PyCFunction)StateTable_clear, METH_NOARGS, "Remove every key."},
    {"update", (PyCFunction)(void (*)(void))StateTable_update, METH_VARARGS | METH_KEYWORDS, update_doc},
    {"__sizeof__", (PyCFunction)StateTable_sizeof, METH_NOARGS, "The table's size in bytes, without keys and values."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef StateTable_getset[] = {
    {"capacity", (getter)StateTable_capacity, NULL, "Slots in the table (a power of two).", NULL},
    {"used", (getter)StateTable_used, NULL, "Slots ever used since the last rebuild: live keys and tombstones.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMappingMethods StateTable_as_mapping = {
    (lenfunc)StateTable_length,
    (binaryfunc)StateTable_subscript,
    (objobjargproc)StateTable_ass_subscript,
};

static PySequenceMethods StateTable_as_sequence = {
    .sq_contains = (objobjproc)StateTable_contains,
};

static PyTypeObject StateTableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "streams._statetable.StateTable",
    .tp_doc = PyDoc_STR("StateTable(items=(), *, fingerprint_bits=64)\n--\n\n"
                        "A mapping of bytes keys with batch reads and writes whose cache misses overlap.\n"
                        "fingerprint_bits < 64 keeps fewer bits of each hash: tests use it to make keys collide."),
    .tp_basicsize = sizeof(StateTable),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = StateTable_new,
    .tp_init = (initproc)StateTable_init,
    .tp_dealloc = (destructor)StateTable_dealloc,
    .tp_traverse = (traverseproc)StateTable_traverse,
    .tp_clear = (inquiry)StateTable_tp_clear,
    .tp_iter = (getiterfunc)StateTable_iter,
    .tp_methods = StateTable_methods,
    .tp_getset = StateTable_getset,
    .tp_as_mapping = &StateTable_as_mapping,
    .tp_as_sequence = &StateTable_as_sequence,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "streams._statetable",
    "The memory store's state table, in C (see the comment at the top of _statetable.c).",
    -1,
    NULL,
};

PyMODINIT_FUNC PyInit__statetable(void) {
    if (PyType_Ready(&StateTableType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&StateTableType);
    if (PyModule_AddObject(m, "StateTable", (PyObject *)&StateTableType) < 0) {
        Py_DECREF(&StateTableType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
