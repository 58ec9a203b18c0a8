package org.firstkit.demo

import android.content.ContentResolver
import android.content.Context
import android.net.Uri
import android.provider.DocumentsContract
import java.io.File
import java.io.IOException

/**
 * Where bundles live on the phone: the app's external files directory, `bundles/<name>`
 * (`/sdcard/Android/data/org.firstkit.demo/files/bundles/<name>`), which `adb push` can write and the app can read
 * without any storage permission. A folder picked with the system picker is copied there first.
 */
object BundleStore {
    fun root(context: Context): File {
        val dir = context.getExternalFilesDir("bundles") ?: File(context.filesDir, "bundles")
        dir.mkdirs()
        return dir
    }

    /** A name under [root] or an absolute path. */
    fun resolve(context: Context, nameOrPath: String): File =
        if (nameOrPath.startsWith("/")) File(nameOrPath) else File(root(context), nameOrPath)

    /** Bundles already on the device (directories with a manifest.json), newest first. */
    fun list(context: Context): List<File> =
        root(context).listFiles { f -> File(f, "manifest.json").isFile }?.sortedByDescending { it.lastModified() }
            ?: emptyList()

    /**
     * Copies a picked document tree into [root] under its display name. Written to a temporary directory and
     * renamed at the end, so an interrupted copy never looks like a bundle.
     */
    fun importTree(context: Context, tree: Uri): File {
        val resolver = context.contentResolver
        val rootId = DocumentsContract.getTreeDocumentId(tree)
        val name = displayName(resolver, DocumentsContract.buildDocumentUriUsingTree(tree, rootId)) ?: "picked"
        val dest = File(root(context), name.replace('/', '_'))
        val tmp = File(root(context), ".tmp-$name-${System.nanoTime()}")
        try {
            copyChildren(resolver, tree, rootId, tmp)
            if (!File(tmp, "manifest.json").isFile) throw IOException("$name has no manifest.json: not a firstkit bundle")
            if (dest.exists()) dest.deleteRecursively()
            if (!tmp.renameTo(dest)) throw IOException("cannot move the copied bundle to $dest")
            return dest
        } finally {
            if (tmp.exists()) tmp.deleteRecursively()
        }
    }

    private fun copyChildren(resolver: ContentResolver, tree: Uri, parentId: String, into: File) {
        if (!into.mkdirs() && !into.isDirectory) throw IOException("cannot create $into")
        val children = DocumentsContract.buildChildDocumentsUriUsingTree(tree, parentId)
        val cols = arrayOf(
            DocumentsContract.Document.COLUMN_DOCUMENT_ID,
            DocumentsContract.Document.COLUMN_DISPLAY_NAME,
            DocumentsContract.Document.COLUMN_MIME_TYPE
        )
        resolver.query(children, cols, null, null, null)?.use { c ->
            while (c.moveToNext()) {
                val id = c.getString(0)
                val name = c.getString(1)
                if (name.contains('/') || name == "..") throw IOException("bad file name in picked folder: $name")
                val target = File(into, name)
                if (c.getString(2) == DocumentsContract.Document.MIME_TYPE_DIR) {
                    copyChildren(resolver, tree, id, target)
                } else {
                    val uri = DocumentsContract.buildDocumentUriUsingTree(tree, id)
                    resolver.openInputStream(uri)?.use { input ->
                        target.outputStream().use { out -> input.copyTo(out, 1 shl 20) }
                    } ?: throw IOException("cannot read $name")
                }
            }
        } ?: throw IOException("cannot list the picked folder")
    }

    private fun displayName(resolver: ContentResolver, doc: Uri): String? =
        resolver.query(doc, arrayOf(DocumentsContract.Document.COLUMN_DISPLAY_NAME), null, null, null)?.use { c ->
            if (c.moveToFirst()) c.getString(0) else null
        }
}
